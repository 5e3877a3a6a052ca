"""Run by ComfyUI-Manager after it installs requirements.txt (and usable by hand: python install.py).

It installs nothing (ComfyUI-Manager installs requirements.txt itself, and the Comfy Registry's rules forbid running
pip from a node pack); it checks what the pack needs with the Python that runs ComfyUI and says what to do.
"""
import importlib.util
import sys
from pathlib import Path

REQUIRED = {"torch": "torch", "diffusers": "diffusers", "transformers": "transformers", "safetensors": "safetensors",
            "PIL": "pillow", "numpy": "numpy"}


def main() -> int:
    missing = [package for module, package in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        requirements = Path(__file__).with_name("requirements.txt")
        print(f"[DreamBooth Studio] missing: {', '.join(missing)}. Install them into ComfyUI's Python: "
              f"{sys.executable} -m pip install -r {requirements}"
              + (" (torch: install ComfyUI's own first)" if "torch" in missing else ""))
        return 1
    try:
        import bitsandbytes  # noqa: F401  (a broken CUDA build raises more than ImportError)
        print("[DreamBooth Studio] 8-bit AdamW (bitsandbytes) is available.")
    except Exception as error:
        print(f"[DreamBooth Studio] bitsandbytes does not load ({error}); choose optimizer 'adamw' "
              "(more memory) or reinstall bitsandbytes for your CUDA version.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
