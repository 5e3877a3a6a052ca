"""The engine stands alone: trainer/ never imports ComfyUI, and imports itself relatively so the pack works both as
`python -m trainer` and as a package inside ComfyUI's custom_nodes."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                 "execution", "latent_preview"}


def imported_modules(path: Path) -> list[tuple[str, int]]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append((node.module or "", node.level))
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "trainer").glob("*.py")), ids=lambda p: p.name)
def test_engine_imports_no_comfyui_and_itself_relatively(path):
    for name, level in imported_modules(path):
        top = name.split(".")[0]
        assert level or top not in COMFY_MODULES, f"{path.name} imports {name}"
        assert level or top != "trainer", f"{path.name} imports {name} absolutely; use a relative import"


@pytest.mark.parametrize("path", sorted((ROOT / "nodes").glob("*.py")), ids=lambda p: p.name)
def test_nodes_reach_the_engine_through_the_package(path):
    for name, level in imported_modules(path):
        assert not (level == 0 and name.split(".")[0] == "trainer"), f"{path.name} imports {name} absolutely"


def test_pack_entry_imports_nothing_heavy_at_import_time():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    top_level_imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert top_level_imports == []
