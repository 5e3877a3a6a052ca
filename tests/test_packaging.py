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


def test_install_py_runs_no_pip_of_its_own_and_no_subprocess():
    tree = ast.parse((REPO / "install.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                             if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"subprocess", "pip", "os"}  # (os.system would be a subprocess too)
    assert "pip install" in (REPO / "install.py").read_text()  # it says what to run instead


def load_installer(monkeypatch, launch=None):
    """install.py as the host runs it: the WebUI's launcher puts a `launch` module on the path; ComfyUI has none."""
    import importlib.util
    import sys
    import types

    if launch is not None:
        monkeypatch.setitem(sys.modules, "launch", launch)
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, real=importlib.util.find_spec:
                            types.SimpleNamespace() if name == "launch" else real(name, *a))
    spec = importlib.util.spec_from_file_location("dreambooth_install", REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeLauncher:
    """The WebUI's launch module: is_installed and run_pip (which records what it is asked)."""

    def __init__(self):
        self.pip = []

    def is_installed(self, package):
        raise AssertionError("install.py decides by version, not by is_installed")

    def run_pip(self, command, desc=None):
        self.pip.append(command)


def test_in_the_webui_only_the_missing_packages_are_installed_and_never_torch(monkeypatch, capsys):
    launcher = FakeLauncher()
    installer = load_installer(monkeypatch, launcher)
    versions = {"diffusers": None, "transformers": "4.30.2", "safetensors": "0.4.2", "pillow": "9.5.0",
                "numpy": "1.26.2", "bitsandbytes": None}
    monkeypatch.setattr(installer, "installed_version", lambda package: versions[package])
    monkeypatch.setattr(installer, "check_bitsandbytes", lambda: None)
    status = installer.main()
    lines = {package: line for package, _, line in installer.requirements()}
    # The WebUI's transformers 4.30.2 gets the newest diffusers that imports beside it.
    assert launcher.pip == [f'install "{lines["diffusers"]},<0.32"', f'install "{lines["bitsandbytes"]}"']
    assert not any("torch" in command for command in launcher.pip)
    old = {package for package, minimum, _ in installer.requirements()
           if minimum and versions[package] and installer.version_tuple(versions[package])
           < installer.version_tuple(minimum)}
    out = capsys.readouterr().out
    assert status == (1 if old else 0) and all(f"{package} {versions[package]} is older" in out for package in old)


def test_the_diffusers_cap_follows_the_installed_transformers(monkeypatch):
    installer = load_installer(monkeypatch)
    for transformers, cap in (("4.30.2", "<0.32"), ("4.37.0", "<0.37"), ("4.46.1", "<0.37"), ("4.48.0", ""),
                              ("5.2.0", ""), (None, "")):
        monkeypatch.setattr(installer, "installed_version", lambda package, v=transformers: v)
        assert installer.diffusers_cap() == cap, transformers


def test_under_comfyui_manager_it_installs_nothing_and_says_what_to_run(monkeypatch, capsys):
    installer = load_installer(monkeypatch)
    assert installer.webui_launcher() is None
    monkeypatch.setattr(installer.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("diffusers", "launch") else object())
    assert installer.main() == 1
    out = capsys.readouterr().out
    assert "missing: diffusers" in out and "-m pip install -r" in out


def test_tests_and_benchmarks_are_not_published():
    ignored = (REPO / ".comfyignore").read_text().split()
    assert {"tests/", "bench/", ".ci/"} <= set(ignored)


def test_registry_metadata():
    comfy = pyproject()["tool"]["comfy"]
    assert comfy["Icon"].endswith("/docs/icon.png") and (REPO / "docs" / "icon.png").is_file()
    assert comfy["requires-comfyui"].startswith(">=0.3.")
    assert "ComfyUI" not in pyproject()["project"]["name"]
