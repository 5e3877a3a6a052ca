"""Our engine against the reference: diffusers' examples/dreambooth/train_dreambooth.py.

Same tiny model, images, seed and settings, prior preservation on, for SD1 with epsilon, SD1 with v-prediction and
SD2 with v-prediction, each with the text encoder frozen and trained. The reference runs in a subprocess with its
random draws recorded (tests/reference_harness.py), our train() replays exactly those draws, and the losses of every
step and the trained weights must equal the reference's bit for bit (see the note above MIN_MOVEMENT for why they can).

The reference script is not part of this repository and imports torchvision and accelerate, so these tests skip unless
DREAMBOOTH_REFERENCE_SCRIPT points at a copy of it and both import (tests/conftest.py; REQUIRE_REFERENCE=1 makes that a
failure). CI's reference step (.ci/run) builds such a Python and runs them; by hand, from the repository root:

    python3 -m venv .venv-reference && .venv-reference/bin/pip install -r tests/requirements-reference.txt
    DREAMBOOTH_REFERENCE_SCRIPT=../shared/reference/train_dreambooth.py \
        .venv-reference/bin/python -m pytest tests/test_reference_equivalence.py -q -s

An SDXL case against diffusers' train_text_to_image_sdxl.py also needs DREAMBOOTH_SDXL_REFERENCE_SCRIPT (see the note
above test_sdxl_weights_match_the_reference_script).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bench.reference_script import reference_args, save_pipeline_folder
from tests.reference_harness import ReplayRandomness, run_reference
from tests.tiny import PHOTOS, tiny_bundle

try:
    from torchvision import transforms
except Exception:  # not installed, or a build that does not match this torch: the tests below skip (conftest.py)
    transforms = None

SCRIPT = os.environ.get("DREAMBOOTH_REFERENCE_SCRIPT", "")
needs_torchvision = pytest.mark.torchvision
needs_reference = pytest.mark.reference

STEPS = 5  # 3 items per epoch: the run crosses an epoch boundary
LEARNING_RATE = 1e-4
RESOLUTION = 32  # tiny: 16x16 latents
INSTANCE_PHOTOS = ("00.jpg", "01.jpg")
CLASS_SIZES = ((96, 72), (70, 110), (128, 128))  # (width, height): exercises resize and centre crop
NUM_ITEMS = max(len(INSTANCE_PHOTOS), len(CLASS_SIZES))  # item i pairs instance i % 2 with class i % 3
MODELS = [("sd1", "epsilon"), ("sd1", "v_prediction"), ("sd2", "v_prediction")]

# Both runs use the same torch, in one process each, with the same number of threads (run_reference), and the harness
# has the reference encode its images one at a time as our latent cache does. Then both do the same arithmetic in the
# same order on the same CPU kernels, and the losses and weights are equal exactly, whatever the thread count or the
# kernels the CPU picks (checked: 1 and 2 threads, AVX-512 and AVX2 kernels). Anything less would need a tolerance
# that AdamW defeats: where a gradient element is at rounding level its update is about +-lr whatever the gradient's
# size (lr * m / (sqrt(v) + 1e-8)), so a rounding difference anywhere can become a difference of lr.
MIN_MOVEMENT = 1e-4  # the reference's weights must move (~5e-4 in 5 steps at lr 1e-4): equality is not of two no-ops


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    instance, classes = root / "instance", root / "class"
    instance.mkdir()
    classes.mkdir()
    for name in INSTANCE_PHOTOS:
        shutil.copy(PHOTOS / "dog" / name, instance / name)
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate(CLASS_SIZES):
        # Smooth colour ramps plus noise: something to encode, and non-square so crops matter.
        y, x = np.mgrid[0:height, 0:width]
        ramp = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
        pixels = np.clip(ramp + rng.normal(0, 40, ramp.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(classes / f"class_{i}.png")
    return instance, classes


def reference_config(tmp_path: Path, **case):
    """Our TrainConfig for the reference scripts' settings (bench/reference_script.py's arguments), plus `case`."""
    from trainer.config import TrainConfig
    return TrainConfig(identifier="zwx", class_noun="dog", output=str(tmp_path / "zwx-dog.safetensors"),
                       resolution=RESOLUTION, batch_size=1, max_train_steps=STEPS, learning_rate=LEARNING_RATE,
                       lr_scheduler="constant", lr_warmup_steps=0, optimizer="adamw", mixed_precision="no",
                       attention="sdpa", adam_weight_decay=1e-2, max_grad_norm=1.0, seed=0, device="cpu",
                       resume=False, **case)


def initial_bundle(model_dir: Path, family: str, prediction_type: str):
    """The tiny bundle with exactly the weights the reference started from."""
    bundle = tiny_bundle(family, prediction_type)
    bundle.unet.load_state_dict(load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors")))
    bundle.text_encoder.load_state_dict(load_file(str(model_dir / "text_encoder" / "model.safetensors")))
    bundle.vae.load_state_dict(load_file(str(model_dir / "vae" / "diffusion_pytorch_model.safetensors")))
    return bundle


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def compare(ours: dict, reference: dict, initial: dict) -> dict:
    """How our final weights differ from the reference's, and how far the reference's moved from the initial ones."""
    assert set(ours) == set(reference), f"tensor names differ: {sorted(set(ours) ^ set(reference))[:5]}"
    out = dict(max_diff=0.0, worst="", unequal=0, moved=0.0)
    for key, ref in reference.items():
        diff = (ours[key].float() - ref.float()).abs()
        out["moved"] = max(out["moved"], (ref.float() - initial[key].float()).abs().max().item())
        out["unequal"] += int((diff > 0).sum())
        if diff.max().item() > out["max_diff"]:
            out["max_diff"], out["worst"] = diff.max().item(), key
    return out


@torch.no_grad()
def print_comparison(title: str, latent_diff: float, ours_losses: list[float], reference_losses: list[float],
                     modules: dict[str, dict]) -> None:
    """What a case found, for `pytest -s`: the posteriors', each step's loss and each module's (compare()'s)."""
    print(f"\n[{title}, {torch.get_num_threads()} threads] {STEPS} steps, lr {LEARNING_RATE}, posteriors max "
          f"|ours - ref| {latent_diff:.2e}")
    for step, (a, b) in enumerate(zip(ours_losses, reference_losses), 1):
        print(f"  step {step}: loss ours {a:.9f} reference {b:.9f} diff {abs(a - b):.2e}")
    for name, c in modules.items():
        print(f"  {name}: max |ours - ref| {c['max_diff']:.2e} ({c['worst'] or '-'}), {c['unequal']} elements "
              f"unequal; max movement from init {c['moved']:.2e}")


def posterior_difference(bundle, run, instance: Path, classes: Path) -> float:
    """Max |difference| between the posteriors (mean, std) the reference sampled each step and ours, computed as
    train() does, one image at a time: checks our image loading, ordering, pairing, to_training_tensor and cache."""
    from trainer.dataset import load_image_folder, to_training_tensor

    def pixels(folder):
        return [to_training_tensor(item.image, RESOLUTION) for item in load_image_folder(folder)]

    inst, cls = pixels(instance), pixels(classes)
    single, worst = {}, 0.0
    for items, mean, std in zip(run.step_items(), run.tensors_of_kind("posterior_mean"),
                                run.tensors_of_kind("posterior_std")):
        keys = [("i", i % len(inst)) for i in items] + [("c", i % len(cls)) for i in items]
        for kind, j in keys:
            if (kind, j) not in single:
                single[kind, j] = bundle.vae.encode((inst if kind == "i" else cls)[j][None]).latent_dist
        ours = torch.cat([torch.cat([single[k].mean for k in keys]), torch.cat([single[k].std for k in keys])])
        worst = max(worst, (ours - torch.cat([mean, std])).abs().max().item())
    return worst


@needs_reference
@pytest.mark.slow
@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["te_frozen", "te_trained"])
@pytest.mark.parametrize("family,prediction_type", MODELS, ids=[f"{f}-{p}" for f, p in MODELS])
def test_weights_match_the_reference_script(images, family, prediction_type, train_text_encoder, tmp_path):
    from trainer.loop import train

    instance, classes = images
    model = save_pipeline_folder(tiny_bundle(family, prediction_type), tmp_path / "model")
    args = reference_args(model, instance, classes, tmp_path / "output", steps=STEPS, learning_rate=LEARNING_RATE,
                          train_text_encoder=train_text_encoder, resolution=RESOLUTION,
                          num_class_images=len(CLASS_SIZES))
    run = run_reference(Path(SCRIPT).resolve(), args, tmp_path / "records")  # resolved: it runs in another folder

    # The reference did what we think it did: its model, its dataset, its draws, one log per step.
    scheduler = json.loads((run.output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction_type
    dataset = run.of_kind("dataset")[0]
    assert dataset["length"] == NUM_ITEMS and dataset["instance"] == list(INSTANCE_PHOTOS)
    run.check_draw_pattern(STEPS, NUM_ITEMS)
    assert len(run.losses) == STEPS

    bundle = initial_bundle(model, family, prediction_type)
    initial_unet, initial_text = state(bundle.unet), state(bundle.text_encoder)
    prompt_ids = bundle.tokenizer(["a zwx dog", "a dog"], padding="max_length", truncation=True,
                                  max_length=bundle.tokenizer.model_max_length).input_ids
    assert prompt_ids == [run.prompt_ids["instance"], run.prompt_ids["class"]], "tokenizers disagree"
    latent_diff = posterior_difference(bundle, run, instance, classes)

    replay = ReplayRandomness(run)
    cfg = reference_config(tmp_path, base_model=f"tiny-{family} (reference equivalence)", instance_dir=str(instance),
                           class_dir=str(classes), with_prior_preservation=True, prior_loss_weight=1.0,
                           num_class_images=len(CLASS_SIZES), train_text_encoder=train_text_encoder)
    result = train(cfg, bundle=bundle, randomness=replay)

    unet = compare(state(bundle.unet), run.unet_state(), initial_unet)
    text = compare(state(bundle.text_encoder), run.text_encoder_state(), initial_text)

    print_comparison(f"{family} {prediction_type} {'te_trained' if train_text_encoder else 'te_frozen'}", latent_diff,
                     result.losses, run.losses, {"unet": unet, "text encoder": text})

    # Same randomness, consumed in the same order, all of it.
    assert replay.calls == run.draw_sequence(), "train() asked for draws in another order than the reference made"
    assert replay.unused() == {}, f"reference draws train() never used: {replay.unused()}"
    assert latent_diff == 0.0, f"our cached posteriors differ from the reference's by {latent_diff:.2e}"
    assert result.losses == run.losses, "the losses differ from the reference's (printed above with -s)"
    for name, c in (("unet", unet), ("text encoder", text)):
        assert c["max_diff"] == 0.0, (f"{name}: {c['unequal']} weights differ from the reference's, at most by "
                                      f"{c['max_diff']:.2e} ({c['worst']})")
    for c in [unet] + ([text] if train_text_encoder else []):
        assert c["moved"] >= MIN_MOVEMENT, f"the reference barely moved ({c['moved']:.2e}): the check is toothless"
    if not train_text_encoder:
        assert text["moved"] == 0.0, "the frozen text encoder changed"


# --------------------------------------------------------------------------------------------------------------------
# SDXL: diffusers has no full DreamBooth fine-tune for SDXL (its DreamBooth SDXL script trains LoRA). Its full
# fine-tune, examples/text_to_image/train_text_to_image_sdxl.py, trains the UNet alone, without prior preservation, and
# samples each image's latents once, before training; we sample them each step, so the replay hands train() that one
# draw of the image at every step. The script resizes with Lanczos by default; our method is train_dreambooth.py's
# bilinear resize, which the script offers as --image_interpolation_mode bilinear. CI has no copy of it, so this test
# runs only where DREAMBOOTH_SDXL_REFERENCE_SCRIPT points at one (with DREAMBOOTH_REFERENCE_SCRIPT set, as for the
# tests above); from the repository root:
#
#     DREAMBOOTH_SDXL_REFERENCE_SCRIPT=/path/to/train_text_to_image_sdxl.py \
#     DREAMBOOTH_REFERENCE_SCRIPT=../shared/reference/train_dreambooth.py \
#         .venv-reference/bin/python -m pytest tests/test_reference_equivalence.py -q -s -m reference -k sdxl
#
# The script imports Hugging Face `datasets`; where it does not import, the harness gives it bench/stand_ins' stand-in.
# --------------------------------------------------------------------------------------------------------------------
SDXL_SCRIPT = os.environ.get("DREAMBOOTH_SDXL_REFERENCE_SCRIPT", "")


@needs_reference
@pytest.mark.slow
@pytest.mark.skipif(not Path(SDXL_SCRIPT).is_file(), reason="DREAMBOOTH_SDXL_REFERENCE_SCRIPT is not a copy of "
                    "diffusers' examples/text_to_image/train_text_to_image_sdxl.py")
def test_sdxl_weights_match_the_reference_script(images, tmp_path):
    from bench.reference_script import save_sdxl_pipeline_folder, sdxl_reference_args, write_caption_folder
    from trainer.dataset import load_image_folder, to_training_tensor
    from trainer.loop import train

    instance, _ = images
    photos = sorted(instance.iterdir())
    model = save_sdxl_pipeline_folder(tiny_bundle("sdxl"), tmp_path / "model")
    data = write_caption_folder(tmp_path / "data", {"a zwx dog": photos})
    args = [*sdxl_reference_args(model, data, tmp_path / "output", steps=STEPS, learning_rate=LEARNING_RATE,
                                 resolution=RESOLUTION, batch_size=1),
            "--image_interpolation_mode", "bilinear"]
    run = run_reference(Path(SDXL_SCRIPT).resolve(), args, tmp_path / "records")
    assert len(run.losses) == STEPS

    bundle = tiny_bundle("sdxl")
    for name, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model"), ("text_encoder_2", "model")):
        getattr(bundle, name).load_state_dict(load_file(str(model / name / f"{file}.safetensors")))
    initial_unet = state(bundle.unet)

    # The latents the script sampled before training, one per photo in the order of their names: ours are sampled
    # from the same posteriors, which our cache computes one image at a time as the script's batches of one do.
    eps = run.tensors_of_kind("precomputed_latent_noise")
    means, stds = run.tensors_of_kind("precomputed_posterior_mean"), run.tensors_of_kind("precomputed_posterior_std")
    assert len(eps) == len(means) == len(stds) == len(photos)
    with torch.no_grad():
        ours = [bundle.vae.encode(to_training_tensor(item.image, RESOLUTION)[None]).latent_dist
                for item in load_image_folder(instance)]
    latent_diff = max((a.mean - m).abs().max().item() for a, m in zip(ours, means))
    latent_diff = max([latent_diff] + [(a.std - s).abs().max().item() for a, s in zip(ours, stds)])

    replay = ReplayRandomness(run)
    replay.queues["latent_noise"] = [torch.cat([eps[i] for i in items]) for items in run.step_items()]
    cfg = reference_config(tmp_path, base_model="tiny-sdxl (reference equivalence)", instance_dir=str(instance),
                           with_prior_preservation=False, train_text_encoder=False)
    result = train(cfg, bundle=bundle, randomness=replay)
    unet = compare(state(bundle.unet), run.unet_state(), initial_unet)

    print_comparison(f"sdxl epsilon, UNet only, no prior, datasets {run.of_kind('datasets')[0]['version']}",
                     latent_diff, result.losses, run.losses, {"unet": unet})

    # The script drew its epoch orders, noise and timesteps in the loop (its latents before it); train() asked for the
    # same, in the same order, plus the latent draw of each step, and used all of them.
    assert [c for c in replay.calls if c != "latent_noise"] == run.draw_sequence()
    assert replay.unused() == {}, f"reference draws train() never used: {replay.unused()}"
    assert latent_diff == 0.0, f"our cached posteriors differ from the reference's by {latent_diff:.2e}"
    assert result.losses == run.losses, "the losses differ from the reference's (printed above with -s)"
    assert unet["max_diff"] == 0.0, (f"{unet['unequal']} UNet weights differ from the reference's, at most by "
                                     f"{unet['max_diff']:.2e} ({unet['worst']})")
    assert unet["moved"] >= MIN_MOVEMENT, f"the reference barely moved ({unet['moved']:.2e}): the check is toothless"


# --------------------------------------------------------------------------------------------------------------------
# Image preparation: bit for bit what the reference's torchvision pipeline produces.
# --------------------------------------------------------------------------------------------------------------------

ODD_SIZES = [  # (width, height, resolution)
    (64, 64, 64), (65, 97, 64), (97, 65, 64), (333, 500, 64), (500, 333, 64), (641, 480, 256), (480, 641, 256),
    (70, 90, 128), (90, 70, 128), (513, 512, 512), (512, 513, 512), (1000, 999, 512), (77, 301, 72), (301, 77, 72),
    (128, 200, 128), (200, 128, 128),
]


def torchvision_pipeline(image: Image.Image, resolution: int) -> torch.Tensor:
    """The transform train_dreambooth.py applies with --center_crop."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])(image)


def synthetic_image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 10_000 + height)
    y, x = np.mgrid[0:height, 0:width]
    ramp = np.stack([x * 255 / width, y * 255 / height, 128 + 0 * x], -1)
    return Image.fromarray(np.clip(ramp + rng.normal(0, 30, ramp.shape), 0, 255).astype(np.uint8))


@needs_torchvision
@pytest.mark.parametrize("name", sorted(p.name for p in (PHOTOS / "dog").glob("*.jpg")))
@pytest.mark.parametrize("resolution", [64, 200, 512])
def test_to_training_tensor_matches_torchvision_on_photos(name, resolution):
    from trainer.dataset import load_image_files, to_training_tensor

    image = load_image_files([PHOTOS / "dog" / name])[0].image
    ours, theirs = to_training_tensor(image, resolution), torchvision_pipeline(image, resolution)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == (3, resolution, resolution)
    assert torch.equal(ours, theirs), f"max difference {(ours - theirs).abs().max().item():.3e}"


@needs_torchvision
@pytest.mark.parametrize("width,height,resolution", ODD_SIZES)
def test_to_training_tensor_matches_torchvision_on_odd_sizes(width, height, resolution):
    from trainer.dataset import to_training_tensor

    image = synthetic_image(width, height)
    ours, theirs = to_training_tensor(image, resolution), torchvision_pipeline(image, resolution)
    assert ours.shape == theirs.shape == (3, resolution, resolution)
    assert torch.equal(ours, theirs), f"max difference {(ours - theirs).abs().max().item():.3e}"
