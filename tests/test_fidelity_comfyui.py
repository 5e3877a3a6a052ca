"""Measure Subject Fidelity inside a real ComfyUI, with a CLIP vision file that ComfyUI's own CLIP Vision Loader takes:
an OpenAI ViT-L/14-shaped image encoder (random weights, fp16, transformers' layout, as IP-Adapter users have it).

Runs only where COMFYUI_DIR is set (see test_comfyui.py); a server of its own, since it needs that file in
models/clip_vision.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

from tests.test_comfyui import COMFYUI_DIR, Server, comfy_home, errors, pytestmark  # noqa: F401 (pytestmark: the skip)
from trainer.image_processors import OPENAI_MEAN, OPENAI_STD

pytestmark = [pytestmark, pytest.mark.slow]
CLIP_FILE = "CLIP-ViT-L-14-random.safetensors"
# ComfyUI's comfy/clip_vision_config_vitl.json: what it builds for a 24-layer file of this shape.
VIT_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             hidden_act="quick_gelu", projection_dim=768, image_size=224, patch_size=14, layer_norm_eps=1e-5)
RED, BLUE = 0xD02010, 0x1030C0


def random_vit_l() -> dict[str, torch.Tensor]:
    """ViT-L/14's tensors in fp16 (300 M parameters, 0.6 GB): norms at one, biases at zero, the rest N(0, 0.02) as
    transformers initialises them; made directly, which is much quicker than building the model."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_L)).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, shape in shapes.items():
        if "norm" in key or "layrnorm" in key:
            tensors[key] = (torch.ones if key.endswith("weight") else torch.zeros)(shape, dtype=torch.float16)
        elif key.endswith("bias"):
            tensors[key] = torch.zeros(shape, dtype=torch.float16)
        else:
            tensors[key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
    return tensors


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base, _ = comfy_home(tmp_path_factory, "comfy")
    (base / "models" / "clip_vision").mkdir(parents=True)
    save_file(random_vit_l(), base / "models" / "clip_vision" / CLIP_FILE)
    running = Server(base)
    yield running
    running.stop()


def solid(color: int, count: int) -> dict:
    return {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": count, "color": color}}


def expected_clip_i(base, generated: list[Image.Image], photos: list[Image.Image]) -> float:
    """CLIP-I with transformers' own ViT-L/14 and CLIP image processor at its defaults (224 px, OpenAI's constants),
    from the same file."""
    from safetensors.torch import load_file

    import transformers

    model = CLIPVisionModelWithProjection.from_pretrained(  # loaded weights are not initialised first: quicker
        None, config=CLIPVisionConfig(**VIT_L), state_dict=load_file(base / "models" / "clip_vision" / CLIP_FILE))

    processor = (getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor)(
        image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    with torch.no_grad():
        def embed(images):
            pixels = torch.as_tensor(np.stack(processor(images=images, return_tensors="np")["pixel_values"]))
            return model.eval()(pixel_values=pixels).image_embeds
        generated, photos = embed(generated), embed(photos)
    return float(torch.nn.functional.cosine_similarity(generated[:, None], photos[None], dim=-1).mean())


def test_measure_node_scores_with_a_clip_vision_file_comfyui_accepts(server):
    info = server.object_info["DBStudioMeasureFidelity"]
    assert info["category"] == "DreamBooth" and all(info["output_tooltips"])
    options = info["input"]["required"]["clip_model"][1]["options"]
    assert options == ["auto", "none", f"clip_vision/{CLIP_FILE}"]

    prompt = {
        "0": {"class_type": "DBStudioToySubjectPhotos", "inputs": {}},
        "1": {"class_type": "ImageFromBatch", "inputs": {"image": ["0", 0], "batch_index": 1, "length": 2}},
        "2": solid(RED, 2),
        "3": solid(BLUE, 1),
        "4": {"class_type": "DBStudioMeasureFidelity",
              "inputs": {"photos": ["1", 0], "generated": ["2", 0], "class_samples": ["3", 0],
                         "prompts": "a zwx star on a red background", "identifier": "zwx", "dino_model": "auto",
                         "clip_model": f"clip_vision/{CLIP_FILE}"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "fidelity"}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", (errors(entry), server.log()[-4000:])
    report = "".join(entry["outputs"]["4"]["text"])
    print(report, *re.findall(r"Prompt executed in .*", server.log()), sep="\n")
    clip_i = re.search(r"^CLIP-I\s+(-?\d\.\d{4})\s+higher\s+CLIP ViT-L/14 \(" + re.escape(CLIP_FILE) + r"\)\s+"
                       r"2 generated x 2 photos$", report, re.M)
    assert clip_i, report

    from trainer.toy.experiment import PHOTO_SIZE
    from trainer.toy.world import subject_views

    photos = [image for image, _ in subject_views("train", size=PHOTO_SIZE)][1:3]
    red = [Image.new("RGB", (96, 64), ((RED >> 16) & 255, (RED >> 8) & 255, RED & 255))]  # both generated images
    assert float(clip_i.group(1)) == pytest.approx(expected_clip_i(server.base, red, photos), abs=2e-4)
    # What the pack cannot do with this file or without other models is said, with where the model goes.
    assert re.search(r"^CLIP-T\s+skipped", report, re.M) and "is a CLIP image encoder only" in report
    evaluators = str(server.base / "models" / "dreambooth_evaluators")
    assert "DINO: no DINO model: put the paper's DINO ViT-S/16" in report and f"{evaluators}/dino-vits16/" in report
    assert re.search(r"^PRES\s+skipped", report, re.M)
    saved = [o for o in entry["outputs"]["5"]["images"]]
    table = Image.open(server.base / "output" / saved[0]["subfolder"] / saved[0]["filename"])
    assert table.width > 300 and table.height > 100

    # Queued again, the node is cached, until a model is added to models/dreambooth_evaluators: then "auto" finds it
    # (a tiny random DINO ViT here) and DINO and PRES are measured too.
    cached = server.wait(server.queue(prompt))["status"]["messages"]
    assert "4" in [n for kind, data in cached if kind == "execution_cached" for n in data["nodes"]]
    torch.manual_seed(0)
    dino = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
                              image_size=32, patch_size=8), add_pooling_layer=False)
    dino.save_pretrained(server.base / "models" / "dreambooth_evaluators" / "tiny-dino")
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", (errors(entry), server.log()[-4000:])
    report = "".join(entry["outputs"]["4"]["text"])
    assert re.search(r"^DINO\s+-?\d\.\d{4}\s+higher\s+DINO ViT/8 \(tiny-dino\)\s+2 generated x 2 photos$", report,
                     re.M), report
    assert re.search(r"^PRES\s+-?\d\.\d{4}\s+lower\s+DINO ViT/8 \(tiny-dino\)\s+1 class samples x 2 photos$",
                     report, re.M), report

    # ComfyUI's own CLIP Vision Loader and Encode take the same file (after the node, so only one copy at a time).
    comfy = {"1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_FILE}},
             "2": solid(RED, 1),
             "3": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 0], "image": ["2", 0],
                                                                "crop": "center"}},
             "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}
    entry = server.wait(server.queue(comfy))
    assert entry["status"]["status_str"] == "success", (errors(entry), server.log()[-4000:])
    assert "missing clip vision" not in server.log() and "clip vision file is invalid" not in server.log()
