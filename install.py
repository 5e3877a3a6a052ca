"""Run by ComfyUI-Manager after it installs requirements.txt (and usable by hand: python install.py).

Installs what is missing with the Python that runs ComfyUI, never touching torch, then reports what works.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

REQUIRED = {"diffusers": "diffusers", "transformers": "transformers", "safetensors": "safetensors", "PIL": "pillow",
            "numpy": "numpy"}


def main() -> int:
    if importlib.util.find_spec("torch") is None:
        print("[DreamBooth Studio] torch is missing: install ComfyUI's torch first (the pack never installs it).")
        return 1
    missing = [package for module, package in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        requirements = Path(__file__).with_name("requirements.txt")
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-r", str(requirements)])
    try:
        import bitsandbytes  # noqa: F401  (a broken CUDA build raises more than ImportError)
        print("[DreamBooth Studio] 8-bit AdamW (bitsandbytes) is available.")
    except Exception as error:
        print(f"[DreamBooth Studio] bitsandbytes does not load ({error}); choose optimizer 'adamw' "
              "(more memory) or reinstall bitsandbytes for your CUDA version.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
