"""The extension in a real Automatic1111 WebUI, started headless on the CPU: set A1111_DIR to a WebUI folder whose
`venv` has its requirements and this pack's (README, Tests); A1111_PYTHON overrides the Python. The WebUI gets a
throw-away data folder (--data-dir: its own models, extensions and outputs) with this repository linked in as an
extension and a tiny SD1-shaped checkpoint (random weights) with the LDM config the WebUI needs for its shapes.

The page test drives the tab in headless Chromium through Playwright (`pip install playwright` in the Python that runs
the tests; the browser is Debian's chromium, or CHROMIUM=/path) and keeps its screenshots in A1111_SCREENSHOTS when
set."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

from bench.models import tiny_text_config, tiny_unet_config, tiny_vae_config
from tests.browser import browser_page
from tests.tiny import PHOTOS, tiny_bundle
from trainer.checkpoint import read_trigger_phrase, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
A1111_DIR = os.environ.get("A1111_DIR", "")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not A1111_DIR, reason="A1111_DIR is not set: these tests start a real WebUI")]
BASE = "tiny-sd1.safetensors"
# A1111's flags for the CPU (tests/test_forge_webui.py has Forge's)
A1111_FLAGS = ("--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision", "full",
               "--disable-console-progressbars")


def ldm_config(clip_folder: Path) -> dict:
    """The WebUI's (LDM) description of the tiny model, from the same configs the tests build it from. The WebUI
    reads a checkpoint's config from a .yaml of the same name beside it; JSON is YAML."""
    unet, vae, text = tiny_unet_config("sd1"), tiny_vae_config(), tiny_text_config("sd1")
    channels = unet["block_out_channels"]
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "timesteps": 1000,
        "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "scale_factor": vae["scaling_factor"],
        "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": channels[0],
            "attention_resolutions": [1], "num_res_blocks": unet["layers_per_block"],
            "channel_mult": [c // channels[0] for c in channels], "num_heads": unet["attention_head_dim"],
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": unet["cross_attention_dim"],
            "use_checkpoint": False, "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": vae["latent_channels"], "lossconfig": {"target": "torch.nn.Identity"}, "ddconfig": {
                "double_z": True, "z_channels": vae["latent_channels"], "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": vae["block_out_channels"][0],
                "ch_mult": [c // vae["block_out_channels"][0] for c in vae["block_out_channels"]],
                "num_res_blocks": vae["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                              "params": {"version": str(clip_folder)}},
    }}, "_text_config": text}


def write_tiny_model(models: Path, work: Path) -> None:
    """The tiny checkpoint, its .yaml, and the CLIP folder the yaml names (the shipped tokenizer, the tiny text
    config: the WebUI builds its text encoder from these instead of asking a model hub)."""
    clip = work / "clip-tiny-sd1"
    shutil.copytree(ROOT / "trainer" / "configs" / "sd1" / "tokenizer", clip)
    config = ldm_config(clip)
    text = config.pop("_text_config")
    (clip / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"],
                                                  "model_type": "clip_text_model", **text}))
    save_checkpoint(tiny_bundle("sd1"), models / BASE, {}, dtype=torch.float32)
    (models / BASE).with_suffix(".yaml").write_text(json.dumps(config, indent=1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebUI:
    """The WebUI in `folder` (A1111's, or Forge's) started with its own `flags`, --api on a free port and `data` as its
    data folder, by `python` (default: the folder's venv)."""

    def __init__(self, data: Path, flags: tuple, folder: str = A1111_DIR, python: str = ""):
        self.data, self.port = data, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data / "webui.log"
        python = python or str(Path(folder) / "venv" / "bin" / "python")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [python, "launch.py", "--skip-prepare-environment", "--skip-version-check", "--api", "--port",
             str(self.port), "--data-dir", str(data), "--no-download-sd-model", *flags],
            cwd=folder, env=env, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the WebUI exited:\n{self.log()[-3000:]}"
            try:
                # the extension's routes come last (app_started), after the WebUI's own API already answers
                if requests.get(f"{self.url}/dreambooth/v1/run", timeout=5).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)
        raise AssertionError(f"the WebUI did not answer in 300 s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **params):
        return requests.get(f"{self.url}{path}", params=params, timeout=60)

    def post(self, path: str, body: dict | None = None):
        return requests.post(f"{self.url}{path}", json=body or {}, timeout=600)

    def events_until_end(self, after: int = 0, timeout: float = 600) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.get("/dreambooth/v1/run", after=after).json()
            if state["state"] not in ("running", "stopping"):
                return state["events"]
            time.sleep(0.5)
        raise AssertionError("the run did not end")

    def draw(self, checkpoint: str, prompt: str, size: int = 128, steps: int = 3) -> Image.Image:
        assert self.post("/sdapi/v1/options", {"sd_model_checkpoint": checkpoint}).ok
        # The WebUI takes latents as 1/8 of the size; the tiny VAE upsamples 2x: 128 px asked, 32 px drawn.
        answer = self.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": steps, "width": size, "height": size,
                                                  "seed": 7, "sampler_name": "Euler"})
        assert answer.ok, answer.text
        return Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).convert("RGB")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    data = tmp_path_factory.mktemp("a1111-data")
    models = data / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    write_tiny_model(models, data)
    (data / "extensions").mkdir()
    (data / "extensions" / "dreambooth-studio").symlink_to(ROOT, target_is_directory=True)
    # The tiny random CLIP's outputs average ~0, and the WebUI's default emphasis divides by that mean.
    (data / "config.json").write_text(json.dumps({"emphasis": "No norm"}))
    server = WebUI(data, (*A1111_FLAGS, "--ckpt", str(models / BASE)), python=os.environ.get("A1111_PYTHON", ""))
    yield server
    server.stop()


def encoded_photos(n: int = 3) -> list[str]:
    out = []
    for path in sorted((PHOTOS / "dog").glob("*.jpg"))[:n]:
        buffer = io.BytesIO()
        Image.open(path).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


def base_title(webui: WebUI) -> str:
    return next(name for name in webui.get("/dreambooth/v1/checkpoints").json()["checkpoints"] if BASE in name)


def settings(webui: WebUI, output_name: str, **overrides) -> dict:
    return {"ckpt_name": base_title(webui), "identifier": "zwx", "class_noun": "dog", "steps": 4, "resolution": 64,
            "num_class_images": 2, "learning_rate": 1e-3, "memory_preset": "custom", "optimizer": "adamw",
            "output_name": output_name, **overrides}


def open_the_tab(page, webui: WebUI) -> None:
    page.goto(webui.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_selector("#tabs", timeout=120_000)
    page.locator("#tabs > .tab-nav > button", has_text="DreamBooth").click()
    page.wait_for_selector("#dreambooth-live", state="visible", timeout=30_000)


def test_install_py_goes_through_the_webuis_launcher():
    """As the WebUI runs an extension's installer (a subprocess in its folder, its folder on the path), with
    --skip-install so that the launcher's run_pip leaves this WebUI's packages as they are."""
    python = os.environ.get("A1111_PYTHON") or str(Path(A1111_DIR) / "venv" / "bin" / "python")
    result = subprocess.run([python, str(ROOT / "install.py"), "--skip-install"], cwd=A1111_DIR, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": A1111_DIR})
    assert result.returncode == 0, result.stdout + result.stderr
    installing = [line for line in result.stdout.splitlines() if "installing" in line]
    assert not any(name in line for line in installing for name in ("torch", "transformers", "pillow"))
    missing = subprocess.run([python, "-c", "import bitsandbytes"], capture_output=True).returncode != 0
    assert any("bitsandbytes" in line for line in installing) == missing, result.stdout


def test_the_tab_and_the_api_are_registered(webui):
    components = webui.get("/config").json()["components"]
    labels = {c.get("props", {}).get("label") for c in components}
    assert {"DreamBooth", "Base checkpoint", "Class noun", "Memory preset", "Steps"} <= labels
    assert webui.get("/dreambooth/v1/run").json()["state"] == "idle"
    ranked = webui.post("/dreambooth/v1/pick-token", {"ckpt_name": base_title(webui), "class_noun": "dog", "count": 3})
    assert ranked.ok and len(ranked.json()["identifiers"]) == 3, ranked.text
    # The WebUI reports a script or callback that fails as "*** Error loading script: ..." or "*** Error executing
    # callback ...". (A checkout without a git remote gets "*** Failed reading extension data", which is no error.)
    assert not [line for line in webui.log().splitlines() if line.startswith("*** Error")]


def test_a_run_through_the_api_lands_in_the_checkpoint_list_and_draws_in_the_webui(webui):
    answer = webui.post("/dreambooth/v1/train", {**settings(webui, "api-dog"), "instance_images": encoded_photos()})
    assert answer.ok, answer.text
    events = webui.events_until_end()
    assert events[-1]["type"] == "done", events[-3:]
    assert [e["step"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4]
    assert any(e["type"] == "phase" and e["what"] == "Class images" for e in events)  # generated on the way
    saved = next(e for e in events if e["type"] == "saved")
    output = webui.data / "models" / "Stable-diffusion" / "dreambooth" / "api-dog.safetensors"
    assert saved["trigger_phrase"] == read_trigger_phrase(output) == "a zwx dog"
    titles = [m["title"] for m in webui.get("/sdapi/v1/sd-models").json()]
    assert saved["checkpoint"] in titles  # in the WebUI's list without a restart
    assert "off the GPU" in webui.log() and "back on" in webui.log()  # the WebUI's model made room and came back

    # The WebUI loads the file as its model (the tiny architecture needs its .yaml beside it) and draws with it:
    # the same seed gives another image than the base model, so the trained weights are the ones in use.
    shutil.copy((webui.data / "models" / "Stable-diffusion" / BASE).with_suffix(".yaml"), output.with_suffix(".yaml"))
    trained = webui.draw(saved["checkpoint"], "a zwx dog on the beach")
    # A second run refreshes the list again; the checkpoint the user chose stays chosen (the WebUI's own refresh
    # would put the --ckpt file back).
    assert webui.post("/dreambooth/v1/train", {**settings(webui, "api-dog-2", steps=1, prior_loss_weight=0.0),
                                               "instance_folder": str(PHOTOS / "dog")}).ok
    assert webui.events_until_end()[-1]["type"] == "done"
    assert webui.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith(saved["checkpoint"])  # + hash
    base = webui.draw(base_title(webui), "a zwx dog on the beach")
    assert trained.size == base.size and trained.tobytes() != base.tobytes()
    assert "Loading weights" in webui.log() and "api-dog.safetensors" in webui.log()


def test_stop_keeps_a_state_and_train_again_continues(webui):
    body = {**settings(webui, "stop-dog", steps=400, prior_loss_weight=0.0, learning_rate=2e-6),
            "instance_folder": str(PHOTOS / "dog")}
    assert webui.post("/dreambooth/v1/train", body).ok
    deadline = time.monotonic() + 300
    while not any(e["type"] == "progress" and e["step"] >= 2 for e in webui.get("/dreambooth/v1/run").json()["events"]):
        assert time.monotonic() < deadline, "no step in 300 s"
        time.sleep(0.2)
    assert webui.post("/dreambooth/v1/stop").json() == {"stopping": True}
    events = webui.events_until_end()
    stopped = events[-1]
    assert stopped["type"] == "stopped" and stopped["step"] < 400, stopped
    assert webui.post("/dreambooth/v1/train", body).status_code == 200  # Train again, same settings
    mark = webui.get("/dreambooth/v1/run").json()["seq"]
    time.sleep(3)
    webui.post("/dreambooth/v1/stop")
    resumed = webui.events_until_end()
    first = next(e["step"] for e in resumed if e["type"] == "progress")
    assert first == stopped["step"] + 1 and mark > stopped["seq"]
    assert any("Resuming" in e.get("text", "") for e in resumed if e["type"] == "status")


def test_bad_settings_get_the_tabs_words_not_a_traceback(webui):
    answer = webui.post("/dreambooth/v1/train", settings(webui, "bad-dog", steps=0,
                                                         instance_folder=str(PHOTOS / "dog")))
    assert answer.status_code == 400 and answer.json()["detail"].startswith("Steps")
    missing = webui.post("/dreambooth/v1/train", settings(webui, "bad-dog", instance_folder="/nowhere/photos"))
    assert missing.status_code in (200, 400)
    if missing.status_code == 200:  # the folder is read when the run starts: the run ends with the message
        events = webui.events_until_end()
        assert events[-1]["type"] == "error" and "/nowhere/photos" in events[-1]["text"]
        assert "Traceback" not in events[-1]["text"]


def test_the_tab_trains_in_a_browser_with_a_live_chart(webui, tmp_path):
    shots = Path(os.environ.get("A1111_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with browser_page(tmp_path / "profile") as (page, problems):
        open_the_tab(page, webui)
        page.locator("#dreambooth_photos input[type=file]").set_input_files(sorted((PHOTOS / "dog").glob("*.jpg"))[:3])
        page.locator("#dreambooth_pick").click()  # measured on the chosen checkpoint; the best one fills Identifier
        page.wait_for_selector("#dreambooth_ranked table", timeout=300_000)
        ranked = page.locator("#dreambooth_ranked table tr").all_inner_texts()
        picked = page.locator("#dreambooth_identifier textarea").input_value()
        page.locator("#dreambooth_identifier textarea").fill("zwx")
        page.locator("#dreambooth_output_name textarea").fill("page-dog")
        page.locator("#dreambooth_steps input").fill("40")
        page.get_by_text("Training settings").click()
        page.locator("#dreambooth_resolution input").fill("64")
        page.locator("#dreambooth_num_class_images input").fill("2")
        page.locator("#dreambooth_train").click()
        status = page.locator("#dreambooth-live .dreambooth-status")
        page.wait_for_function("document.querySelector('#dreambooth-live .dreambooth-status')"
                               ".textContent.startsWith('step ')", timeout=300_000)
        during = status.inner_text()
        page.screenshot(path=str(shots / "a1111-tab-during.png"))
        page.wait_for_function("document.querySelector('#dreambooth-live .dreambooth-trigger').textContent",
                               timeout=600_000)
        page.wait_for_timeout(1000)
        trigger = page.locator("#dreambooth-live .dreambooth-trigger").inner_text()
        after = status.inner_text()
        preview = page.locator("#dreambooth-live .dreambooth-previews img").first
        preview_loaded = preview.evaluate("img => img.complete && img.naturalWidth")
        chart_pixels = page.evaluate("""() => {
            const c = document.querySelector('#dreambooth-live .dreambooth-chart');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let orange = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] > 120 && d[i + 1] < 200 && d[i + 2] < 100) orange++;
            return orange;
        }""")
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots / "a1111-tab-after.png"))
    assert len(ranked) == 11 and picked and ranked[1].split()[1] == picked  # a header and 10 identifiers, best first
    assert during.startswith("step ") and "/40" in during, during
    assert after.startswith("done · 40 steps · dreambooth/page-dog.safetensors"), after
    assert "Trigger phrase: a zwx dog" in trigger and "dreambooth/page-dog.safetensors" in trigger
    assert preview_loaded == 64  # the preview came from the API
    assert chart_pixels > 50  # the smoothed loss line (orange) was drawn on the canvas
    assert problems == []
    photos = sorted((webui.data / "outputs" / "dreambooth" / "photos" / "page-dog").iterdir())
    assert len(photos) == 3  # the uploads, kept for Train again
