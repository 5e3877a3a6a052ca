"""DreamBooth engine: loading, training and exporting Stable Diffusion checkpoints.

Importable without ComfyUI; the graph nodes in ../nodes are thin adapters over it.
"""
