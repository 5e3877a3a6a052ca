"""The Train node's live panel in a real ComfyUI page: headless Chromium (tests/browser.py: Playwright driving Debian's
chromium) opens a ComfyUI started as tests/test_comfyui.py starts it (COMFYUI_DIR), loads the toy example workflow
(the toy base trains in a fraction of a second a step on a CPU, where a full-size random SD 1.5 takes minutes), runs
it, then a longer run that the page's stop button ends, then reloads the page. Everything is read from the page: the
panel's status lines (its canvas's aria-label), the chart's pixels, the node's size. Screenshots go to
COMFYUI_SCREENSHOTS, else to pytest's tmp_path; their paths are printed (-s)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.browser import browser_page
from tests.test_comfyui import TOY_WORKFLOW, Server, comfy_home
from tests.test_comfyui import pytestmark as needs_comfyui

pytestmark = [needs_comfyui, pytest.mark.slow]
TRAIN = "DBStudioTrain"
PANEL = "canvas.dreambooth-panel"
LABEL = f"document.querySelector('{PANEL}')?.getAttribute('aria-label') ?? ''"
# pixels of the smoothed loss line (web/dreambooth_chart_draw.js: rgb(255,170,60)) on the panel's canvas
ORANGE_PIXELS = f"""() => {{
    const c = document.querySelector('{PANEL}');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] > 120 && d[i + 1] < 200 && d[i + 2] < 100) n++;
    return n;
}}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base, _ = comfy_home(tmp_path_factory, "comfy-browser")  # the toy base comes with the pack
    running = Server(base)
    running.post("/settings/Comfy.TutorialCompleted", True)  # no templates dialog over the editor on a first visit
    yield running
    running.stop()


def open_editor(page, server: Server) -> None:
    page.goto(f"http://127.0.0.1:{server.port}", wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function("window.app?.graph && window.app.canvas", timeout=120_000)


def load(page, workflow: dict, train: dict) -> None:
    """The workflow in the editor, the Train node's widgets set as a user types them, the Train node in view."""
    page.evaluate("""async ([workflow, train]) => {
        await window.app.loadGraphData(workflow);
        const node = window.app.graph.nodes.find((n) => n.type === "DBStudioTrain");
        for (const w of node.widgets) if (w.name in train) w.value = train[w.name];
    }""", [workflow, train])
    show_train(page)


def show_train(page) -> None:
    """The Train node in view at 100% (the panel paints only where it shows)."""
    page.evaluate("""() => {
        const node = window.app.graph.nodes.find((n) => n.type === "DBStudioTrain");
        Object.assign(window.app.canvas.ds, { scale: 1, offset: [40 - node.pos[0], 60 - node.pos[1]] });
        window.app.canvas.setDirty(true, true);
    }""")


def label(page) -> str:
    return page.evaluate(LABEL)


def wait_label(page, js_test: str, timeout: float = 300) -> str:
    page.wait_for_function(f"(({LABEL}))" + js_test, timeout=timeout * 1000)
    return label(page)


def test_the_panel_live_stopped_and_after_a_reload(server, tmp_path):
    shots = Path(os.environ.get("COMFYUI_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    workflow = json.loads(TOY_WORKFLOW.read_text())
    shipped = next(node for node in workflow["nodes"] if node["type"] == TRAIN)
    with browser_page(tmp_path / "profile") as (page, problems):
        open_editor(page, server)
        # 1. A short run to the end: status every step, the chart, the sample preview; the node's full size.
        load(page, workflow, {"steps": 20, "output_name": "browser-star"})
        page.evaluate("window.app.queuePrompt(0, 1)")
        during = wait_label(page, ".startsWith('step ')")
        done = wait_label(page, ".startsWith('done')")
        page.wait_for_function("window.app.graph.nodes.find((n) => n.type === 'DBStudioTrain').imgs?.length",
                               timeout=60_000)
        page.wait_for_timeout(1500)  # the preview's image loads and the node grows to show it
        size = page.evaluate("window.app.graph.nodes.find((n) => n.type === 'DBStudioTrain').size")
        print(f"Train node at full size: {size}; the example workflow's: {shipped['size']}")
        done_pixels = page.evaluate(ORANGE_PIXELS)
        page.screenshot(path=str(shots / "comfyui-train-done.png"))

        # 2. A long run that the stop button ends: the panel says stopped, and how to go on.
        load(page, workflow, {"steps": 5000, "output_name": "browser-stopped-star"})
        page.evaluate("window.app.queuePrompt(0, 1)")
        running = wait_label(page, ".match(/^step ([3-9]|\\d\\d+)\\/5000/) != null")
        running_pixels = page.evaluate(ORANGE_PIXELS)
        page.screenshot(path=str(shots / "comfyui-train-running.png"))
        page.locator("button[aria-label='Cancel current run']").click()  # the Run bar's stop
        stopped = wait_label(page, ".startsWith('stopped')")
        page.screenshot(path=str(shots / "comfyui-train-stopped.png"))

        # 3. The page reloaded: the last run is back, not "waiting for a run".
        page.reload(wait_until="domcontentloaded")
        page.wait_for_function("window.app?.graph?.nodes?.some((n) => n.type === 'DBStudioTrain')", timeout=120_000)
        show_train(page)
        reloaded = wait_label(page, ".startsWith('stopped')", timeout=60)
        page.wait_for_timeout(500)
        reloaded_pixels = page.evaluate(ORANGE_PIXELS)
        page.screenshot(path=str(shots / "comfyui-train-reloaded.png"))
    for name in ("done", "running", "stopped", "reloaded"):
        print(f"screenshot: {shots / f'comfyui-train-{name}.png'}")

    assert during.startswith("step ") and "/20 · loss " in during, during
    assert done.startswith("done · 20 steps · dreambooth/browser-star.safetensors"), done
    assert done_pixels > 50 and running_pixels > 50  # the smoothed loss line was drawn
    assert size[0] <= shipped["size"][0] and size[1] <= shipped["size"][1], (size, shipped["size"])
    assert "/5000 · loss " in running, running
    step = int(stopped.split()[3])
    assert stopped.startswith(f"stopped at step {step} · its state is kept — Queue the same workflow again"), stopped
    assert step >= int(running.split()[1].split("/")[0])
    assert reloaded == stopped and reloaded_pixels > 50  # the same lines and the chart, after the reload
    # the pack's scripts only: frontend 1.27.10 throws one of its own at each start (addSetting, "reading 'id'")
    assert [problem for problem in problems if "dreambooth" in problem.lower()] == []
