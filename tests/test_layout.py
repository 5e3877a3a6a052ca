"""The engine stands alone: trainer/ imports neither host (ComfyUI, the A1111/Forge WebUI), and imports itself
relatively so the pack works as `python -m trainer`, as a package inside ComfyUI's custom_nodes and as the WebUI's
extension. Neither host's adapter (nodes/, a1111/) imports the other host or the other adapter."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                 "execution", "latent_preview"}
WEBUI_MODULES = {"modules", "launch", "gradio", "fastapi", "starlette", "a1111", "scripts"}


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
        assert level or top not in COMFY_MODULES | WEBUI_MODULES, f"{path.name} imports {name}"
        assert level or top != "trainer", f"{path.name} imports {name} absolutely; use a relative import"


@pytest.mark.parametrize("path", sorted((ROOT / "nodes").glob("*.py")) + sorted((ROOT / "a1111").glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_hosts_adapter_reaches_the_engine_through_the_package_and_not_the_other_host(path):
    other_host = WEBUI_MODULES - {"gradio", "fastapi", "starlette"} if path.parent.name == "nodes" else COMFY_MODULES
    for name, level in imported_modules(path):
        top = name.split(".")[0]
        assert not (level == 0 and top == "trainer"), f"{path.name} imports {name} absolutely"
        assert level or top not in other_host, f"{path.parent.name}/{path.name} imports the other host's {name}"
        other_adapter = "a1111" if path.parent.name == "nodes" else "nodes"
        assert not (level and (name.split(".")[0] == other_adapter or name.startswith(f"{other_adapter}."))), \
            f"{path.parent.name}/{path.name} imports the other adapter ({name})"


def test_the_webui_entry_loads_the_pack_by_its_own_name_and_nothing_of_comfyui():
    entry = ROOT / "scripts" / "dreambooth_studio.py"
    assert sorted((ROOT / "scripts").glob("*.py")) == [entry]  # the WebUI runs every .py there
    assert not {name.split(".")[0] for name, _ in imported_modules(entry)} & COMFY_MODULES


def test_pack_entry_imports_nothing_heavy_at_import_time():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    top_level_imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert top_level_imports == []


def engine_import_graph() -> dict[str, set[str]]:
    """trainer's modules -> the trainer modules each imports (TYPE_CHECKING imports too: a cycle there is one too)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in sorted((ROOT / "trainer").rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
                for alias in node.names:  # `from . import speed` imports the module trainer.speed
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = targets
    return graph


def test_the_engine_has_no_import_cycles():
    graph = engine_import_graph()
    assert "trainer.bundle" in graph["trainer.checkpoint"] and "trainer.models" not in graph["trainer.checkpoint"]

    def visit(node, path):
        assert node not in path, f"import cycle: {' -> '.join([*path[path.index(node):], node])}"
        for target in graph.get(node, ()):
            visit(target, [*path, node])

    for module in graph:
        visit(module, [])


def test_benchmarks_do_not_import_the_tests():
    for path in sorted((ROOT / "bench").glob("*.py")):
        assert not any(name.split(".")[0] == "tests" for name, level in imported_modules(path) if not level), path
