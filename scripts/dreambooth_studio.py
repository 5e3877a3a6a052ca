"""Automatic1111 / Forge WebUI entry: the WebUI runs each extension's scripts/*.py at start and at "Reload UI".

It loads the repository as the package `dreambooth_studio` (once per process, so a run going on survives a UI
reload) and adds the DreamBooth tab and API (a1111/). ComfyUI never reads this folder."""
import importlib.util
import sys
from pathlib import Path

PACKAGE = "dreambooth_studio"

if PACKAGE not in sys.modules:
    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location(PACKAGE, _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    sys.modules[PACKAGE] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[PACKAGE])

importlib.import_module(f"{PACKAGE}.a1111").register()
