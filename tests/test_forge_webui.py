"""The extension in a real Forge (lllyasviel/stable-diffusion-webui-forge), started headless on the CPU: set FORGE_DIR
to a Forge folder whose `venv` has its requirements (FORGE_PYTHON overrides the Python). The same harness as
tests/test_a1111_webui.py, with Forge's differences: Forge recognises a model only by real shapes, so the base is a
full-size SD 1.5 with random weights (2.1 GB, written and deleted by the test; Forge uses ~16 GB of memory while the
extension trains it; ~2 minutes in all on 2 cores), and the page has Gradio 4. The page test needs Playwright and Chromium as the A1111 one, and keeps
its screenshot in FORGE_SCREENSHOTS when set."""
from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from bench.models import random_bundle
from tests.browser import browser_page
from tests.test_a1111_webui import ROOT, WebUI, open_the_tab
from tests.tiny import PHOTOS
from trainer.checkpoint import read_trigger_phrase, save_checkpoint

FORGE_DIR = os.environ.get("FORGE_DIR", "")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not FORGE_DIR, reason="FORGE_DIR is not set: these tests start a real Forge")]
BASE = "random-sd1.safetensors"
# With --data-dir elsewhere, Forge's Gradio 4 serves files from the data folder only: its own script.js (onUiLoaded,
# which the extension's script waits for) would answer 403 without its folder allowed too.
FORGE_FLAGS = ("--always-cpu", "--skip-google-blockly", "--gradio-allowed-path", FORGE_DIR)


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    data = tmp_path_factory.mktemp("forge-data")
    models = data / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    try:
        save_checkpoint(random_bundle("sd1", small=False), models / BASE, {}, dtype=torch.float16)
        gc.collect()
        (data / "extensions").mkdir()
        (data / "extensions" / "dreambooth-studio").symlink_to(ROOT, target_is_directory=True)
        # The model by the settings, not --ckpt: each refresh of the list would select the --ckpt file again.
        (data / "config.json").write_text(json.dumps({"sd_model_checkpoint": BASE}))
        server = WebUI(data, FORGE_FLAGS, folder=FORGE_DIR, python=os.environ.get("FORGE_PYTHON", ""))
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(data / "models")  # the base and the trained checkpoint, 2 GB each


@pytest.fixture(scope="module")
def trained(forge) -> list[dict]:
    """The events of a 2-step run through the API (on the CPU a full-size step takes ~10 s)."""
    base = next(name for name in forge.get("/dreambooth/v1/checkpoints").json()["checkpoints"] if BASE in name)
    answer = forge.post("/dreambooth/v1/train", {
        "ckpt_name": base, "identifier": "zwx", "class_noun": "dog", "steps": 2, "resolution": 64,
        "prior_loss_weight": 0, "learning_rate": 1e-3, "memory_preset": "custom", "optimizer": "adamw",
        "output_name": "forge-dog", "instance_folder": str(PHOTOS / "dog")})
    assert answer.ok, answer.text
    return forge.events_until_end()


def test_the_tab_and_the_api_are_registered(forge):
    labels = {c.get("props", {}).get("label") for c in forge.get("/config").json()["components"]}
    assert {"DreamBooth", "Base checkpoint", "Class noun", "Memory preset", "Steps"} <= labels
    assert any(BASE in name for name in forge.get("/dreambooth/v1/checkpoints").json()["checkpoints"])
    assert forge.get("/dreambooth/v1/run").json()["state"] in ("idle", "done")
    # Only this extension's: Forge's own built-ins may miss a package in a trimmed venv (joblib for soft inpainting).
    assert not [line for line in forge.log().splitlines() if line.startswith("*** Error") and "dreambooth" in line]


def test_a_run_through_the_api_is_saved(forge, trained):
    assert [e["type"] for e in trained[-2:]] == ["saved", "done"], trained[-3:]
    assert [e["step"] for e in trained if e["type"] == "progress"] == [1, 2]
    output = forge.data / "models" / "Stable-diffusion" / "dreambooth" / "forge-dog.safetensors"
    assert trained[-2]["trigger_phrase"] == read_trigger_phrase(output) == "a zwx dog"
    assert "off the GPU while DreamBooth works; Forge loads them back" in forge.log()  # a1111/webui.py, FORGE_MEMORY


def test_forge_lists_the_trained_checkpoint_and_draws_with_it(forge, trained):
    saved = trained[-2]["checkpoint"]
    assert saved in [m["title"] for m in forge.get("/sdapi/v1/sd-models").json()]  # without a restart
    drawn = forge.draw(saved, "a zwx dog on the beach", size=64, steps=2)
    assert "forge-dog.safetensors" in forge.log().split("Loading Model:")[-1].splitlines()[0]  # Forge loaded it
    base = forge.draw(BASE, "a zwx dog on the beach", size=64, steps=2)
    assert drawn.size == base.size == (64, 64) and drawn.tobytes() != base.tobytes()  # the trained weights drew


def test_the_page_shows_the_run_and_takes_uploads(forge, trained, tmp_path):
    """The live panel (javascript/, polling the API) in Forge's page shows the run that ended; an upload reaches the
    tab's Python as Gradio 4 gives it (a path), and bad settings come back as the tab's message."""
    shots = Path(os.environ.get("FORGE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with browser_page(tmp_path / "profile") as (page, problems):
        open_the_tab(page, forge)
        page.wait_for_function("document.querySelector('#dreambooth-live .dreambooth-status')"
                               ".textContent.startsWith('done')", timeout=60_000)
        page.wait_for_timeout(1000)
        status = page.locator("#dreambooth-live .dreambooth-status").inner_text()
        trigger = page.locator("#dreambooth-live .dreambooth-trigger").inner_text()
        preview_loaded = page.locator("#dreambooth-live .dreambooth-previews img").first.evaluate(
            "img => img.complete && img.naturalWidth")
        page.screenshot(path=str(shots / "forge-tab.png"))
        photos = sorted((PHOTOS / "dog").glob("*.jpg"))[:3]
        page.locator("#dreambooth_photos input[type=file]").set_input_files(photos)
        page.locator("#dreambooth_photos tr.file").nth(2).wait_for(timeout=30_000)  # the three uploaded
        page.locator("#dreambooth_identifier textarea").fill("zwx")
        page.locator("#dreambooth_output_name textarea").fill("upload-dog")
        page.locator("#dreambooth_steps input").fill("0")
        page.locator("#dreambooth_train").click()
        page.wait_for_selector("#dreambooth_message .dreambooth-error", timeout=60_000)
        message = page.locator("#dreambooth_message").inner_text()
    assert status.startswith("done · 2 steps · dreambooth/forge-dog.safetensors"), status
    assert "Trigger phrase: a zwx dog" in trigger
    assert preview_loaded == 64  # the preview came from the API
    assert message.startswith("Steps"), message
    assert len(list((forge.data / "outputs" / "dreambooth" / "photos" / "upload-dog").iterdir())) == 3
    assert problems == []
