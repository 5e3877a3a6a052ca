"""The repository imported as one package, as its hosts load it (ComfyUI by its folder, the WebUI's scripts/ entry
as `dreambooth_studio`): for tests of the adapters' modules, which reach the engine relatively (`..trainer`)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

NAME = "dreambooth_studio"
ROOT = Path(__file__).resolve().parents[1]


def pack_module(name: str):
    """`pack_module("nodes.comfy_io")`: that module of the pack. Its engine is the pack's own copy
    (dreambooth_studio.trainer), not the `trainer` the other tests import."""
    if NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{NAME}.{name}")
