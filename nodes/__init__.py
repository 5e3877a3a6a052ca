"""ComfyUI adapters: the only part of the pack that imports ComfyUI (see extension.py). Each node converts its
inputs, calls trainer/, and converts the results; comfy_io.py holds the conversions that need no ComfyUI."""
