"""The page side (web/): the JavaScript unit tests pass under Node.js, and every file ComfyUI will load is valid
ES module code that imports only what the page can serve."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"
WEB_FILES = sorted(WEB.rglob("*.js"))
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js (`node`) is not on PATH; the web/ checks need it")


def run_node(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([NODE, *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120)


@needs_node
def test_javascript_unit_tests_pass():
    result = run_node("--test", "tests/web/")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    passed = re.search(r"^# pass (\d+)$", output, re.M)
    assert passed and int(passed.group(1)) >= 30, f"expected the tests/web/ suites to run:\n{output[-3000:]}"
    assert re.search(r"^# fail 0$", output, re.M), output[-3000:]


def test_web_holds_the_extension_modules():
    names = {path.name for path in WEB_FILES}
    assert {"dreambooth_progress.js", "dreambooth_chart_core.js", "dreambooth_chart_draw.js"} <= names


@needs_node
@pytest.mark.parametrize("path", WEB_FILES, ids=lambda p: p.name)
def test_web_file_is_valid_es_module_syntax(path: Path):
    # syntax only: --check parses without resolving "../../scripts/app.js", which only exists in ComfyUI's page
    result = run_node("--input-type=module", "--check", stdin=path.read_text(encoding="utf-8"))
    assert result.returncode == 0, f"{path.relative_to(ROOT)}:\n{result.stderr}"


@needs_node
def test_the_webui_script_is_valid_classic_script_syntax():
    """The WebUI loads javascript/*.js as classic scripts (not modules): no top-level import or export."""
    path = ROOT / "javascript" / "dreambooth_studio.js"
    result = run_node("--check", str(path))
    assert result.returncode == 0, result.stderr
    assert not re.search(r"^\s*(import|export)\s", path.read_text(encoding="utf-8"), re.M)


IMPORT = re.compile(r"""(?:\bfrom\s*|\bimport\s*\(?\s*)["']([^"']+)["']""")


@pytest.mark.parametrize("path", WEB_FILES, ids=lambda p: p.name)
def test_web_file_imports_only_what_the_page_serves(path: Path):
    """ComfyUI loads every .js under web/ into the page: no tests, no node: modules, no bare package names."""
    assert "test" not in path.name.lower(), "tests belong in tests/web/, not under web/"
    for spec in IMPORT.findall(path.read_text(encoding="utf-8")):
        assert spec.startswith("./") or spec.startswith("../../scripts/"), f"{path.name} imports {spec!r}"
        if spec.startswith("./"):
            assert (path.parent / spec).is_file(), f"{path.name} imports missing {spec!r}"


def test_extension_listens_for_what_the_server_sends():
    js = (WEB / "dreambooth_progress.js").read_text(encoding="utf-8")
    train = (ROOT / "nodes" / "train.py").read_text(encoding="utf-8")
    hooks = (ROOT / "nodes" / "comfy_hooks.py").read_text(encoding="utf-8")
    node_class = re.search(r'const NODE_CLASS = "([^"]+)"', js).group(1)
    assert f'node_id="{node_class}"' in train
    listened = set(re.findall(r'api\.addEventListener\("([^"]+)"', js))
    assert {"dreambooth.progress", "dreambooth.status", "dreambooth.done"} <= listened
    assert 'send_sync(f"dreambooth.{event}"' in hooks
    sent = {f"dreambooth.{event}" for event in re.findall(r'self\.send\("(\w+)"', hooks)}
    assert sent and sent <= listened, f"sent but not shown: {sent - listened}"
