"""The pack inside a real ComfyUI: both example workflows end to end, the stop button, and errors as a user sees them.

Runs only when COMFYUI_DIR points at a ComfyUI checkout whose Python (COMFYUI_PYTHON, default
$COMFYUI_DIR/.venv/bin/python) has ComfyUI's and this pack's requirements. The server is started with --cpu on
loopback, on a throw-away base directory holding this pack (linked) and an SD1.5-shaped checkpoint with random
weights; the personalize workflow runs on it at 64 px with a couple of steps, the toy workflow as shipped.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.comfyui import ComfyUI, api_prompt, execution_errors, pack_home
from tests.tiny import PHOTOS, tiny_bundle
from trainer.checkpoint import read_metadata, save_checkpoint
from trainer.models import build_bundle, shipped_configs
from trainer.toy import world
from trainer.toy.evaluators import load_evaluators

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR or not Path(COMFYUI_DIR, "main.py").exists(),
                                reason="set COMFYUI_DIR to a ComfyUI checkout to run the pack in a real ComfyUI")
REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "example_workflows" / "dreambooth_personalize.json"
TOY_WORKFLOW = REPO / "example_workflows" / "dreambooth_toy.json"
SDXL_WORKFLOW = REPO / "example_workflows" / "dreambooth_sdxl.json"
BASE_MODEL = "sd15-random.safetensors"
TINY_SDXL = "tiny-sdxl.safetensors"  # ComfyUI's own loader knows SDXL only at full size; the pack's engine trains it
TOY_BASE = "DreamBooth Studio toy base (32 px demo)"  # how the pack's nodes list trainer/toy/base.safetensors
PACK_NODES = ("DBStudioPickRareToken", "DBStudioGenerateClassPriors", "DBStudioTrain", "DBStudioLoadSubjectModel",
              "DBStudioEmptyLatent", "DBStudioToySubjectPhotos")


class Server(ComfyUI):
    """ComfyUI on the CPU (COMFYUI_DIR, run by COMFYUI_PYTHON or its .venv) on a throw-away base directory."""

    def __init__(self, base: Path, *options: str):
        super().__init__(Path(COMFYUI_DIR), base, "--cpu", *options, python=os.environ.get("COMFYUI_PYTHON"))


class Messages:
    """The server's websocket messages (ComfyUI's /ws), read with the standard library: a client of RFC 6455 that only
    listens. Connect before queueing: messages sent earlier are not replayed."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /ws?clientId=dreambooth-tests HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._receive()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head.decode(errors="replace")

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the websocket")
        self.buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._receive()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def next(self) -> dict:
        """The next text message as JSON; binary ones (previews) are skipped, pings answered."""
        while True:
            first, second = self._take(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length >= 126:
                length = int.from_bytes(self._take(2 if length == 126 else 8), "big")
            assert not second & 0x80, "a server's frames are not masked"
            payload = self._take(length)
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                raise ConnectionError("the server closed the websocket")
            if opcode == 0x9:  # ping -> pong, masked as a client's frames must be
                mask = os.urandom(4)
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + mask +
                                  bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def wait_for(self, message_type: str, accept=lambda data: True, timeout: float = 600) -> dict:
        """The data of the first message of this type that `accept`s it."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                message = self.next()
            except socket.timeout:
                break
            if message.get("type") == message_type and accept(message.get("data")):
                return message["data"]
        raise TimeoutError(f"no {message_type!r} message in {timeout:.0f} s")

    def close(self) -> None:
        self.sock.close()


def comfy_home(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """A ComfyUI base directory with this pack linked into custom_nodes/, and its models/checkpoints folder."""
    base = tmp_path_factory.mktemp(name)
    return base, pack_home(base)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base, checkpoints = comfy_home(tmp_path_factory, "comfy")
    configs = shipped_configs("sd1")
    torch.manual_seed(0)
    save_checkpoint(build_bundle("sd1", "epsilon", configs.unet, configs.vae, configs.text), checkpoints / BASE_MODEL,
                    {})  # fp16, no metadata of ours: it stands for a checkpoint downloaded from anywhere
    save_checkpoint(tiny_bundle("sdxl"), checkpoints / TINY_SDXL, {})
    for subject in ("dog",):
        shutil.copytree(PHOTOS / subject, base / "photos" / subject)
    running = Server(base)
    yield running
    running.stop()


def tiny_run(prompt: dict, photos: Path, output_name: str) -> dict:
    """The example workflow at 64 px with a couple of steps, on the random base model."""
    for node in prompt.values():
        if "ckpt_name" in node["inputs"] and not isinstance(node["inputs"]["ckpt_name"], list):
            node["inputs"]["ckpt_name"] = BASE_MODEL
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    pick = next(key for key, node in prompt.items() if node["class_type"] == "DBStudioPickRareToken")
    for node_type in ("DBStudioGenerateClassPriors", "DBStudioTrain"):  # the class noun is typed once
        assert by_type[node_type]["class_noun"] == [pick, 2], node_type
    by_type["DBStudioPickRareToken"].update(candidates=3)
    by_type["DBStudioGenerateClassPriors"].update(count=2, size=64, steps=2)
    # The leanest preset: on this CPU its fallback without bf16 (fp32, fused 8-bit AdamW, checkpointing)
    by_type["DBStudioTrain"].update(instance_folder=str(photos), steps=2, resolution=64, memory_preset="8 GB",
                                    learning_rate=1e-5, output_name=output_name)
    by_type["EmptyLatentImage"].update(width=64, height=64, batch_size=1)
    by_type["KSampler"].update(steps=2)
    return prompt


errors = execution_errors


def test_pack_loads_with_its_nodes_and_templates(server):
    for node_id in PACK_NODES:
        assert node_id in server.object_info, server.log()[-3000:]
        info = server.object_info[node_id]
        assert info["category"] == "DreamBooth"
        assert len(info["output_tooltips"]) == len(info["output"]) and all(info["output_tooltips"]), node_id
    assert sorted(server.get("/workflow_templates")["dreambooth_studio"]) == ["dreambooth_personalize",
                                                                             "dreambooth_sdxl", "dreambooth_toy"]
    assert not [line for line in server.log().splitlines() if "IMPORT FAILED" in line and "dreambooth" in line]


def test_sdxl_workflow_draws_at_the_models_own_size(server):
    """The SDXL template as the editor queues it: every widget value lands on the input it is meant for."""
    prompt = api_prompt(json.loads(SDXL_WORKFLOW.read_text()), server.object_info)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert by_type["DBStudioGenerateClassPriors"]["size"] == 0 and by_type["DBStudioTrain"]["resolution"] == 0
    assert by_type["DBStudioTrain"]["memory_preset"] == "auto" and by_type["DBStudioTrain"]["output_name"] == \
        "my-dog-sdxl"
    assert (by_type["EmptyLatentImage"]["width"], by_type["EmptyLatentImage"]["height"]) == (1024, 1024)
    assert by_type["DBStudioLoadSubjectModel"]["ckpt_name"][0] == next(  # wired to Train's checkpoint output
        key for key, node in prompt.items() if node["class_type"] == "DBStudioTrain")
    for node_type in ("DBStudioPickRareToken", "DBStudioGenerateClassPriors", "DBStudioTrain"):
        assert by_type[node_type]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    for node_type in ("DBStudioGenerateClassPriors", "DBStudioTrain"):
        assert server.object_info[node_type]["input"]["required"][{"DBStudioTrain": "resolution"}.get(
            node_type, "size")][1]["default"] == 0  # new graphs: the model's own size too


def test_the_packs_nodes_take_an_sdxl_checkpoint_as_it_comes(server):
    """Pick Rare Token, Generate Class Priors (at the model's own size) and DreamBooth Train on an SDXL file (a tiny
    one): the family is read from the file and named in the log. tests/test_comfyui_sdxl.py runs a full-size one
    through ComfyUI's loader too."""
    prompt = {
        "1": {"class_type": "DBStudioPickRareToken",
              "inputs": {"ckpt_name": TINY_SDXL, "class_noun": "dog", "candidates": 2, "seed": 0}},
        "2": {"class_type": "DBStudioGenerateClassPriors",
              "inputs": {"ckpt_name": TINY_SDXL, "class_noun": ["1", 2], "count": 1, "size": 0, "steps": 2,
                         "guidance": 5.0, "seed": 0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        "4": {"class_type": "DBStudioTrain", "inputs": {
            **train_only(server.base / "photos" / "dog", "tiny-sdxl-dog", steps=1)["1"]["inputs"],
            "ckpt_name": TINY_SDXL, "identifier": ["1", 0], "class_images": ["2", 0], "resolution": 32,
            "optimizer": "adamw"}},
    }
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", (errors(entry), server.log()[-4000:])
    previews = entry["outputs"]["3"]["images"]
    assert [Image.open(server.base / "temp" / p["subfolder"] / p["filename"]).size for p in previews] == [(16, 16)]
    assert "[DreamBooth] Training SDXL at 32 px on cpu; memory preset 'custom': precision no" in server.log()
    trained = server.base / "models" / "checkpoints" / "dreambooth" / "tiny-sdxl-dog.safetensors"
    assert read_metadata(trained)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"

    load = {"1": {"class_type": "DBStudioLoadSubjectModel", "inputs": {"ckpt_name": "dreambooth/" + trained.name}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}}
    error = failure(server, load)
    assert error["exception_type"] == "ValueError" and "SDXL at their full sizes" in error["exception_message"]


def checkpoint_options(info: dict) -> list[str]:
    return info["input"]["required"]["ckpt_name"][1]["options"]


def test_the_toy_base_is_offered_by_the_packs_nodes_only(server):
    for node_id in ("DBStudioPickRareToken", "DBStudioGenerateClassPriors", "DBStudioTrain",
                    "DBStudioLoadSubjectModel"):
        assert checkpoint_options(server.object_info[node_id]) == [BASE_MODEL, TINY_SDXL, TOY_BASE]  # real ones first
    # ComfyUI's own loader cannot load it, so it is not offered there.
    assert TOY_BASE not in server.object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


def test_example_workflow_trains_loads_and_samples(server):
    prompt = tiny_run(api_prompt(json.loads(WORKFLOW.read_text()), server.object_info),
                      server.base / "photos" / "dog", "e2e-dog")
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", (errors(entry), server.log()[-4000:])

    trained = server.base / "models" / "checkpoints" / "dreambooth" / "e2e-dog.safetensors"
    trigger = read_metadata(trained)["modelspec.trigger_phrase"]
    article, identifier = trigger.split()[:2]
    assert trigger == f"{article} {identifier} dog" and identifier.isalpha() and identifier != "sks"
    assert article == ("an" if identifier[0] in "aeiou" else "a")  # the picked token varies; "an anism dog"
    shown = {tuple(out["text"]) for out in entry["outputs"].values() if "text" in out}
    assert (trigger,) in shown  # Load Subject Model's trigger phrase reached the graph

    saved = [o for out in entry["outputs"].values() for o in out.get("images", []) if o["type"] == "output"]
    pixels = np.asarray(Image.open(server.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1  # NaN conditioning or latents decode to flat black
    assert "clip missing" not in server.log() and "left over keys" not in server.log()
    assert "Training SD 1.x at 64 px; memory preset '8 GB' on cpu: 8 GB; precision no, optimizer adamw8bit, " \
           "gradient checkpointing, fused backward" in server.log()
    assert re.search(r"\[DreamBooth\] Step 2/2: loss \d", server.log())  # a headless user sees training move

    # The stock loader reads the file too (what a user does in any other workflow).
    plain = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreambooth/e2e-dog.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": f"{trigger} on the beach", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], "seed": 1, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "plain"}},
    }
    entry = server.wait(server.queue(plain))
    assert entry["status"]["status_str"] == "success", errors(entry)


def train_only(photos: Path | None, output_name: str, steps: int, **settings) -> dict:
    inputs = {
        "ckpt_name": BASE_MODEL, "identifier": "lnp", "class_noun": "dog", "num_class_images": 1, "steps": steps,
        "learning_rate": 1e-5, "prior_loss_weight": 1.0, "train_text_encoder": False, "resolution": 64,
        "batch_size": 1, "optimizer": "adamw8bit", "attention": "auto", "gradient_checkpointing": True,
        "precision": "no", "fused_backward": False, "bf16_weights": False, "memory_preset": "custom", "seed": 0,
        "output_name": output_name, "instance_folder": str(photos or "")}
    return {"1": {"class_type": "DBStudioTrain", "inputs": {**inputs, **settings}}}


def test_stop_button_keeps_the_server_healthy_and_writes_no_half_file(server):
    messages = Messages(server.port)
    try:
        prompt_id = server.queue(train_only(server.base / "photos" / "dog", "stopped-dog", steps=500))
        # The Train node's per-step message (nodes/comfy_hooks.py): a step is done, so training is under way.
        progress = messages.wait_for("dreambooth.progress", lambda data: data["step"] >= 1)
        assert progress["total"] == 500
        server.post("/interrupt")
        # The panel is told the run stopped (web/ shows "stopped at step N", not the last step's progress).
        stopped = messages.wait_for("dreambooth.stopped", timeout=300)
    finally:
        messages.close()
    assert stopped["step"] >= progress["step"] and "Queue the same workflow again" in stopped["text"]
    entry = server.wait(prompt_id, timeout=300)
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"]), entry["status"]
    folder = server.base / "models" / "checkpoints" / "dreambooth"
    assert not (folder / "stopped-dog.safetensors").exists()
    assert (folder / "stopped-dog.state" / "state.json").exists()  # queueing again resumes from here
    listed = server.get("/object_info/CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]
    assert not [name for name in listed["ckpt_name"][0] if ".state" in name]  # the state is not a checkpoint
    assert not [p for p in folder.iterdir() if p.suffix != ".safetensors" and not p.name.endswith(".state")]
    assert "DBStudioTrain" in server.get("/object_info")  # the server still answers
    assert server.get("/queue")["queue_running"] == []


def test_a_corrupt_photo_gives_an_error_that_names_it(server):
    photos = server.base / "photos" / "corrupt"
    shutil.copytree(server.base / "photos" / "dog", photos)
    (photos / "99-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    messages = Messages(server.port)
    try:
        prompt_id = server.queue(train_only(photos, "corrupt-dog", steps=2, identifier="sks"))
        shown = messages.wait_for("dreambooth.error")  # the panel says it too (web/: "error: ...", in red)
    finally:
        messages.close()
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "error"
    error = errors(entry)[0]
    message = error["exception_message"]
    assert shown["text"] == message.strip()  # (ComfyUI ends its copy with a newline)
    assert "99-broken.jpg" in message and ("re-export" in message.lower() or "remove" in message.lower())
    assert error["exception_type"] == "ValueError"  # not '<pack folder>.trainer.dataset.ImageError'


def test_a_poor_identifier_is_a_warning_on_the_node_and_in_the_log_in_the_nodes_words(server):
    prompt = train_only(server.base / "photos" / "dog", "sks-star", steps=1, ckpt_name=TOY_BASE, identifier="sks",
                        class_noun="star", resolution=32, prior_loss_weight=0.0, optimizer="adamw")
    messages = Messages(server.port)
    try:
        prompt_id = server.queue(prompt)
        status = messages.wait_for("dreambooth.status", lambda data: data["text"].startswith("Warning: 'sks'"))
    finally:
        messages.close()
    assert server.wait(prompt_id)["status"]["status_str"] == "success"
    assert "Pick Rare Token node" in status["text"] and "python -m" not in status["text"]
    assert f"[DreamBooth] {status['text']}" in server.log()


def failure(server: Server, prompt: dict) -> dict:
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "error", entry["status"]
    return errors(entry)[0]


def test_node_errors_are_builtin_types_that_name_node_inputs(server):
    pick = {"1": {"class_type": "DBStudioPickRareToken",
                  "inputs": {"ckpt_name": TOY_BASE, "class_noun": "  ", "candidates": 2, "seed": 0}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    priors = {"1": {"class_type": "DBStudioGenerateClassPriors",
                    "inputs": {"ckpt_name": TOY_BASE, "class_noun": "", "count": 1, "size": 32, "steps": 1,
                               "guidance": 5.0, "seed": 0}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    for prompt in (pick, priors):
        error = failure(server, prompt)
        assert error["exception_type"] == "ValueError"
        assert error["exception_message"].startswith("class_noun is empty"), error["exception_message"]

    error = failure(server, train_only(None, "no-photos", steps=1))
    assert error["exception_type"] == "ValueError"
    assert "instance_images" in error["exception_message"] and "instance_folder" in error["exception_message"]

    # The engine's setting mixed_precision is this node's precision.
    error = failure(server, train_only(server.base / "photos" / "dog", "fp16-fused", steps=1, precision="fp16",
                                       fused_backward=True))
    assert error["exception_type"] == "ValueError"
    assert "precision 'fp16'" in error["exception_message"] and "mixed_precision" not in error["exception_message"]


def sampling_prompt(trained: dict, ckpt_name: str, text: str, prefix: str) -> dict:
    """The toy workflow's sampling nodes on `ckpt_name` with a fixed prompt (its KSampler settings)."""
    sampler = next(node["inputs"] for node in trained.values() if node["class_type"] == "KSampler")
    latent = next(node["inputs"] for node in trained.values() if node["class_type"] == "DBStudioEmptyLatent")
    return {
        "1": {"class_type": "DBStudioLoadSubjectModel", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "DBStudioEmptyLatent", "inputs": {**latent, "vae": ["1", 2]}},
        "5": {"class_type": "KSampler", "inputs": {**sampler, "model": ["1", 0], "positive": ["2", 0],
                                                   "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def saved_images(server: Server, entry: dict) -> list[Image.Image]:
    saved = [o for out in entry["outputs"].values() for o in out.get("images", []) if o["type"] == "output"]
    return [Image.open(server.base / "output" / o["subfolder"] / o["filename"]).convert("RGB") for o in saved]


def test_toy_workflow_as_shipped_trains_the_toy_subject_and_samples_it(server):
    prompt = api_prompt(json.loads(TOY_WORKFLOW.read_text()), server.object_info)
    started = time.monotonic()
    entry = server.wait(server.queue(prompt))
    print(f"toy workflow: {time.monotonic() - started:.0f} s")
    assert entry["status"]["status_str"] == "success", (errors(entry), server.log()[-4000:])

    trigger = read_metadata(server.base / "models" / "checkpoints" / "dreambooth" /
                            "toy-star.safetensors")["modelspec.trigger_phrase"]
    assert re.fullmatch(r"an? [a-z]+ star", trigger), trigger
    steps = [int(n) for n in re.findall(r"\[DreamBooth\] Step (\d+)/400: loss", server.log())]
    assert steps[0] == 1 and steps[-1] == 400 and len(steps) >= 40  # every 10 steps (or 30 s)

    images = saved_images(server, entry)
    assert len(images) == 4 and all(image.size == (32, 32) for image in images)
    # Drawn through ComfyUI's KSampler, the trained model shows the subject; the base model, same prompt and seed,
    # does not (the toy world's evaluators; the subject's held-out photos score about 0.99 against each other).
    text = f"{trigger} on a green background"
    base = saved_images(server, server.wait(server.queue(sampling_prompt(prompt, TOY_BASE, text, "toy-base"))))
    evaluators = load_evaluators()
    heldout = [image for image, _ in world.subject_views("heldout")]
    trained_fidelity = evaluators.subject_fidelity(images, heldout)
    base_fidelity = evaluators.subject_fidelity(base, heldout)
    print(f"subject fidelity through ComfyUI: base {base_fidelity:.3f}, trained {trained_fidelity:.3f}")
    assert trained_fidelity > 0.5 and trained_fidelity - base_fidelity > 0.3, (base_fidelity, trained_fidelity)


def test_requeue_reuses_the_result_until_a_photo_changes(server):
    photos = server.base / "photos" / "cached"
    shutil.copytree(server.base / "photos" / "dog", photos)
    prompt = train_only(photos, "cached-dog", steps=1)

    def train_ran(entry) -> bool:
        assert entry["status"]["status_str"] == "success", errors(entry)
        cached = [n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]]
        return "1" not in cached

    assert train_ran(server.wait(server.queue(prompt)))
    assert not train_ran(server.wait(server.queue(prompt)))  # same graph, same photos: nothing to do
    Image.open(photos / "00.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "00.jpg")
    # A photo changed behind the same folder path: the node runs again, and keeps the file trained from the old
    # photos unless told to replace it, saying so in its own inputs' names.
    error = failure(server, prompt)
    assert error["exception_type"] == "ValueError", error
    assert error["exception_message"].startswith("output_name: ") and "set overwrite" in error["exception_message"]
    prompt["1"]["inputs"]["overwrite"] = True
    assert train_ran(server.wait(server.queue(prompt)))


def test_the_capped_comfyui_benchmark_reports_every_node_and_the_phases_each_ran(tmp_path):
    # bench/comfyui_bench.py's wiring on the toy workflow (on a GPU it runs the example workflow at full size, capped)
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "comfyui_bench.py"), "--comfyui", COMFYUI_DIR,
                           *(["--python", os.environ["COMFYUI_PYTHON"]] if os.environ.get("COMFYUI_PYTHON") else []),
                           "--small", "--caps", "7.6", "--out", str(report)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    [run] = json.loads(report.read_text())
    assert run["status"] == "success" and run["cpu"]
    phases = {node["node"]: [phase["phase"] for phase in node["phases"]] for node in run["nodes"]}
    assert phases["DBStudioPickRareToken"] == ["token probing"]
    assert phases["DBStudioGenerateClassPriors"] == ["class images"]
    assert phases["DBStudioTrain"] == ["photo encoding", "training", "previews", "saving"]
    assert {"DBStudioLoadSubjectModel", "KSampler", "VAEDecode", "SaveImage"} <= set(phases)
    assert "| DBStudioTrain | training |" in done.stdout
