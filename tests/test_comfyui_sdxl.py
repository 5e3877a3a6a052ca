"""A full-size SDXL-shaped checkpoint (random weights) through the pack in a real ComfyUI: ComfyUI's own loader reads
our export without missing or left-over keys, Generate Class Priors and DreamBooth Train run two training steps on it
and save, and Load Subject Model loads the result and samples it exactly as Load Checkpoint does.

Slow, and it needs COMFYUI_DIR, as tests/test_comfyui.py. Measured on a 2-core CPU shared with other jobs (load
average 6-8): 35 minutes, of which each training step about 7 minutes and the Train node's preview (20 steps at
256 px) 8; ComfyUI's peak resident memory 20.0 GiB. It needs about 24 GB of RAM and 15 GB of disk: the base file and
the trained one are 7 GB each (fp16), and a CPU holds SDXL in fp32 where ComfyUI samples (about 17 GB). So the
settings are the leanest there are: 256 px, bf16 weights with stochastic rounding, the optimizer fused into the
backward pass, 8-bit AdamW, gradient checkpointing, one class image; and ComfyUI keeps no node outputs between
prompts (--cache-none), so one model at a time is in memory.
"""
from __future__ import annotations

import gc
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.models import random_bundle
from tests.test_comfyui import COMFYUI_DIR, Server, comfy_home, errors
from tests.tiny import PHOTOS
from trainer.checkpoint import read_metadata, save_checkpoint

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR or not Path(COMFYUI_DIR, "main.py").exists(),
                                 reason="set COMFYUI_DIR to a ComfyUI checkout to run the pack in a real ComfyUI")]
BASE_MODEL = "sdxl-random.safetensors"
SIZE = 256
# ComfyUI's loader leaves out, at debug level only, the weights no text encoder uses for a prompt: CLIP's logit_scale
# (for image-text similarity) and CLIP-L's text projection (SDXL's first encoder has none).
UNUSED_BY_COMFYUI = re.compile(r"clip_[lg]\.logit_scale|clip_l\.transformer\.text_projection\.weight")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base, checkpoints = comfy_home(tmp_path_factory, "comfy-sdxl")
    started = time.monotonic()
    bundle = random_bundle("sdxl", small=False, dtype=torch.float16)
    save_checkpoint(bundle, checkpoints / BASE_MODEL, {})  # no metadata of ours: as downloaded from anywhere
    del bundle
    gc.collect()
    print(f"full-size SDXL checkpoint written: {time.monotonic() - started:.0f} s")
    shutil.copytree(PHOTOS / "dog", base / "photos" / "dog")
    running = Server(base, "--cache-none", "--verbose", "DEBUG")  # DEBUG: ComfyUI's key reports are debug lines
    yield running
    running.stop()


def sampling(loader: str, text: str, prefix: str) -> dict:
    """Node `loader`'s MODEL, CLIP and VAE -> the text and an empty negative -> KSampler, 2 steps -> a saved image."""
    return {
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": [loader, 1]}},
        "12": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [loader, 1]}},
        "13": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "14": {"class_type": "KSampler", "inputs": {"model": [loader, 0], "positive": ["11", 0], "negative": ["12", 0],
                                                    "latent_image": ["13", 0], "seed": 7, "steps": 2, "cfg": 5.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": [loader, 2]}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": prefix}},
    }


def stock_loader(name: str) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}}


def run(server: Server, prompt: dict, what: str) -> tuple[dict, float]:
    started = time.monotonic()
    entry = server.wait(server.queue(prompt), timeout=3600)
    seconds = time.monotonic() - started
    assert entry["status"]["status_str"] == "success", (what, errors(entry), server.log()[-6000:])
    print(f"{what}: {seconds:.0f} s")
    return entry, seconds


def saved_pixels(server: Server, entry: dict) -> np.ndarray:
    saved = [o for out in entry["outputs"].values() for o in out.get("images", []) if o["type"] == "output"]
    assert len(saved) == 1
    return np.asarray(Image.open(server.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]))


def key_reports(log: str) -> list[str]:
    """ComfyUI's reports of weights a checkpoint lacks or has too many of (comfy/sd.py, comfy/model_base.py), less
    the text-encoder weights it never uses."""
    reports = [line for line in log.splitlines()
               if re.search(r"unet (missing|unexpected)|clip (missing|unexpected)|(Missing|Leftover) VAE keys|"
                            r"left over keys", line)]
    return [line for line in reports if not (line.startswith("clip missing: ") and all(
        UNUSED_BY_COMFYUI.fullmatch(key) for key in re.findall(r"'([^']+)'", line)))]


def test_full_size_sdxl_loads_trains_saves_loads_and_samples(server):
    # Our export (the base file was written by save_checkpoint) in ComfyUI's own loader.
    entry, _ = run(server, {**stock_loader(BASE_MODEL), **sampling("1", "a dog", "base")},
                   "base model: load and sample in ComfyUI")
    assert "model_type EPS" in server.log() and "clip missing: [" in server.log()  # an SDXL, read at DEBUG level
    assert key_reports(server.log()) == []
    assert saved_pixels(server, entry).shape == (SIZE, SIZE, 3)

    train = {
        "1": {"class_type": "DBStudioGenerateClassPriors",
              "inputs": {"ckpt_name": BASE_MODEL, "class_noun": "dog", "count": 1, "size": SIZE, "steps": 2,
                         "guidance": 5.0, "seed": 0}},
        "2": {"class_type": "DBStudioTrain", "inputs": {
            "ckpt_name": BASE_MODEL, "identifier": "lnp", "class_noun": "dog", "num_class_images": 1, "steps": 2,
            "learning_rate": 1e-5, "prior_loss_weight": 1.0, "train_text_encoder": False, "resolution": SIZE,
            "batch_size": 1, "optimizer": "adamw8bit", "attention": "auto", "gradient_checkpointing": True,
            "precision": "bf16", "fused_backward": True, "bf16_weights": True, "memory_preset": "custom", "seed": 0,
            "output_name": "sdxl-dog", "instance_folder": str(server.base / "photos" / "dog"),
            "class_images": ["1", 0]}},
        "3": {"class_type": "DBStudioLoadSubjectModel", "inputs": {"ckpt_name": ["2", 0]}},
    }
    entry, train_seconds = run(server, {**train, **sampling("3", "a lnp dog on the beach", "trained")},
                               "class image, 2 training steps, save, Load Subject Model, sample")

    trained = server.base / "models" / "checkpoints" / "dreambooth" / "sdxl-dog.safetensors"
    metadata = read_metadata(trained)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["modelspec.trigger_phrase"] == "a lnp dog" and metadata["dreambooth.steps"] == "2"
    assert ("[DreamBooth] Training SDXL at 256 px on cpu; memory preset 'custom': precision bf16, optimizer adamw8bit, "
            "gradient checkpointing, fused backward, bf16 weights, text encoder frozen") in server.log()
    assert re.search(r"\[DreamBooth\] Step 2/2: loss \d", server.log())
    assert key_reports(server.log()) == []  # the trained file too
    through_pack = saved_pixels(server, entry)
    assert through_pack.shape == (SIZE, SIZE, 3)

    entry, _ = run(server, {**stock_loader("dreambooth/sdxl-dog.safetensors"),
                            **sampling("1", "a lnp dog on the beach", "stock")}, "trained model in Load Checkpoint")
    assert np.array_equal(saved_pixels(server, entry), through_pack)  # Load Subject Model gives what it gives
    peak = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{server.process.pid}/status").read_text())
    print(f"ComfyUI's peak resident memory: {int(peak.group(1)) / 2**20:.1f} GiB; training graph {train_seconds:.0f} s")
