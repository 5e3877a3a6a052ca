"""What ComfyUI-Manager and the Comfy Registry see: one dependency list, an installer that installs nothing, what is
not published, the icon and the ComfyUI version the V3 API needs."""
import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_and_requirements_list_the_same_dependencies():
    requirements = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert sorted(pyproject()["project"]["dependencies"]) == sorted(requirements)
    assert not any(line.startswith(("torch", "torchvision", "torchaudio")) for line in requirements)  # ComfyUI's own


def test_install_py_runs_no_pip_and_no_subprocess():
    tree = ast.parse((REPO / "install.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                             if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"subprocess", "pip", "os"}  # (os.system would be a subprocess too)
    assert "pip install" in (REPO / "install.py").read_text()  # it says what to run instead


def test_tests_and_benchmarks_are_not_published():
    ignored = (REPO / ".comfyignore").read_text().split()
    assert {"tests/", "bench/", ".ci/"} <= set(ignored)


def test_registry_metadata():
    comfy = pyproject()["tool"]["comfy"]
    assert comfy["Icon"].endswith("/docs/icon.png") and (REPO / "docs" / "icon.png").is_file()
    assert comfy["requires-comfyui"].startswith(">=0.3.")
    assert "ComfyUI" not in pyproject()["project"]["name"]
