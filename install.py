"""Run at launch by the Automatic1111 / Forge WebUI (through its launcher), by ComfyUI-Manager after it installs
requirements.txt, or by hand (python install.py).

- In the WebUI: installs the packages of requirements.txt that are missing, with the WebUI's own helpers
  (launch.is_installed, launch.run_pip), never torch (the WebUI's own). A package the WebUI already has in an older
  version is not upgraded (the WebUI pins its versions and would put its own back at the next launch): it is named,
  with what to do.
- Elsewhere (ComfyUI-Manager, by hand): installs nothing (ComfyUI-Manager installs requirements.txt itself, and the
  Comfy Registry's rules forbid running pip from a node pack); it checks what the pack needs with the Python that runs
  ComfyUI and says what to do.
"""
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
NEVER_INSTALLED = {"torch", "torchvision", "torchaudio"}  # the host's own build for its GPU
# diffusers does not declare which transformers it needs: the newest releases import transformers classes that an
# older one lacks (0.32-0.36 SiglipImageProcessor, from 4.37; 0.37 Dinov2WithRegistersConfig, from 4.48). The
# A1111 WebUI 1.10 pins transformers 4.30.2, so it gets the newest diffusers that imports beside it.
DIFFUSERS_CAPS = (((4, 37), "<0.32"), ((4, 48), "<0.37"))
IMPORT_NAMES = {"pillow": "PIL"}


def requirements() -> list[tuple[str, str, str]]:
    """(package, minimum version or "", the line) for each line of requirements.txt."""
    parsed = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9][0-9.]*))?", line)
        if match:
            parsed.append((match.group(1).lower(), match.group(2) or "", line))
    return parsed


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def webui_launcher():
    """The WebUI's launch module when the WebUI runs this file (it puts its folder on the path), else None."""
    if importlib.util.find_spec("launch") is None:
        return None
    import launch

    return launch if hasattr(launch, "run_pip") and hasattr(launch, "is_installed") else None


def too_old(package: str, minimum: str, have: str) -> str:
    return (f"[DreamBooth Studio] {package} {have} is older than the {minimum} it needs. The WebUI pins {package}, so "
            f"it is not upgraded here; update the WebUI, or run {sys.executable} -m pip install '{package}>={minimum}' "
            "if you accept the WebUI's warning about it.")


def diffusers_cap() -> str:
    """The diffusers version bound that the installed transformers can import, or ""."""
    transformers = installed_version("transformers")
    return next((cap for below, cap in DIFFUSERS_CAPS if transformers and version_tuple(transformers) < below), "")


def install_in_webui(launch) -> int:
    problems = 0
    for package, minimum, line in requirements():
        if package in NEVER_INSTALLED:
            continue
        have = installed_version(package)
        if have is None:
            cap = diffusers_cap() if package == "diffusers" else ""
            spec = f"{line},{cap}" if cap else line
            print(f"[DreamBooth Studio] installing {spec} with the WebUI's pip")
            launch.run_pip(f'install "{spec}"', f"{package} for DreamBooth Studio")
        elif minimum and version_tuple(have) < version_tuple(minimum):
            print(too_old(package, minimum, have))
            problems += 1
    return 1 if problems else 0


def check_only() -> int:
    missing = [package for package, _, _ in requirements()
               if importlib.util.find_spec(IMPORT_NAMES.get(package, package)) is None]
    if missing:
        print(f"[DreamBooth Studio] missing: {', '.join(missing)}. Install them into ComfyUI's Python: "
              f"{sys.executable} -m pip install -r {REQUIREMENTS}")
        return 1
    if importlib.util.find_spec("torch") is None:
        print("[DreamBooth Studio] torch is missing: install ComfyUI's own first.")
        return 1
    return 0


def check_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401  (a broken CUDA build raises more than ImportError)
        print("[DreamBooth Studio] 8-bit AdamW (bitsandbytes) is available.")
    except Exception as error:
        print(f"[DreamBooth Studio] bitsandbytes does not load ({error}); choose optimizer 'adamw' "
              "(more memory) or reinstall bitsandbytes for your CUDA version.")


def main() -> int:
    launch = webui_launcher()
    status = install_in_webui(launch) if launch else check_only()
    if status == 0:
        check_bitsandbytes()
    return status


if __name__ == "__main__":
    sys.exit(main())
