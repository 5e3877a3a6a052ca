"""Our engine against the reference: diffusers' examples/dreambooth/train_dreambooth.py.

Same tiny model, images, seed and settings, prior preservation on; the reference runs in a subprocess with its random
draws recorded (tests/reference_harness.py), our train() replays exactly those draws, and the losses of every step and
the trained weights must match the reference's to float tolerance, for the text encoder frozen and trained (see the
note above GRAD_FLOOR for the few weights where AdamW turns rounding into +-lr and only a looser bound can hold).

The reference script is not part of this repository and imports torchvision and accelerate, so these tests skip unless
DREAMBOOTH_REFERENCE_SCRIPT points at a copy of it and both import (tests/conftest.py; REQUIRE_REFERENCE=1 makes that a
failure). CI's reference step (.ci/run) builds such a Python and runs them; by hand, from the repository root:

    python3 -m venv .venv-reference && .venv-reference/bin/pip install -r tests/requirements-reference.txt
    DREAMBOOTH_REFERENCE_SCRIPT=../shared/reference/train_dreambooth.py \
        .venv-reference/bin/python -m pytest tests/test_reference_equivalence.py -q -s
"""
from __future__ import annotations

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

# Both runs use the same torch and differ only in batching: the reference encodes each step's two images through the
# VAE together, we cache each image's posterior alone. That changes the latents by rounding (~3e-6), and AdamW turns
# rounding into visible weight differences wherever a gradient element is itself at rounding level: its update is
# lr * m / (sqrt(v) + 1e-8), about +-lr whatever the gradient's size. Whole tensors are like that in the tiny UNet
# (biases before a GroupNorm with one channel per group, whose gradient is exactly zero in exact arithmetic), and a few
# elements elsewhere. So the weights are held to float tolerance where AdamW is well conditioned, i.e. for elements
# whose gradient was at least GRAD_FLOOR at every step (the gradients recorded from our run; they must be the vast
# majority of the elements that get a gradient) or exactly zero at every step (unused token embeddings), and every
# element, conditioned or not, to the most AdamW can move a weight in STEPS steps.
GRAD_FLOOR = 1e-6  # 100x AdamW's epsilon, ~1e4x the gradients' rounding level here
WEIGHT_ATOL = 1e-6  # on conditioned elements (weights are O(0.1-1); observed ~1e-7)
MIN_CONDITIONED = 0.9  # share of elements with a gradient that must be conditioned (observed ~96%)
ADAM_BOUND = 1.5 * LEARNING_RATE * STEPS  # |AdamW update| <~ lr per step; any element differs by less than this
MIN_MOVEMENT = 100 * WEIGHT_ATOL  # the reference's weights must move far more than the tolerance
LOSS_RTOL = 1e-5
PIXEL_PATH_ATOL = 1e-6  # same images, same batch through the same VAE: observed exactly 0
LATENT_ATOL = 1e-5  # per-image (ours) vs batched (reference) VAE encoding of values ~1: observed 2.7e-6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
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
    model = save_pipeline_folder(tiny_bundle("sd1"), root / "model")
    return root, instance, classes, model


@pytest.fixture(scope="module")
def reference_runs(inputs):
    """The reference's run for each train_text_encoder setting, made once per module."""
    root, instance, classes, model = inputs
    runs = {}

    def get(train_text_encoder: bool):
        if train_text_encoder not in runs:
            case = root / ("te_trained" if train_text_encoder else "te_frozen")
            args = reference_args(model, instance, classes, case / "output", steps=STEPS,
                                  learning_rate=LEARNING_RATE, train_text_encoder=train_text_encoder,
                                  resolution=RESOLUTION, num_class_images=len(CLASS_SIZES))
            # resolved: the reference runs in another working directory
            runs[train_text_encoder] = run_reference(Path(SCRIPT).resolve(), args, case / "records")
        return runs[train_text_encoder]

    return get


def initial_bundle(model_dir: Path):
    """The tiny bundle with exactly the weights the reference started from."""
    bundle = tiny_bundle("sd1")
    bundle.unet.load_state_dict(load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors")))
    bundle.text_encoder.load_state_dict(load_file(str(model_dir / "text_encoder" / "model.safetensors")))
    bundle.vae.load_state_dict(load_file(str(model_dir / "vae" / "diffusion_pytorch_model.safetensors")))
    return bundle


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def record_gradient_range(modules: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Hooks that keep, per parameter element, the smallest and the largest |gradient| seen over the steps."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            def hook(p, key=f"{prefix}.{name}"):
                g = p.grad.detach().abs()
                low, high = seen.get(key, (g, g))
                seen[key] = (torch.minimum(low, g), torch.maximum(high, g))
            param.register_post_accumulate_grad_hook(hook)
    return seen


def compare(ours: dict, reference: dict, initial: dict, grads: dict) -> dict:
    """Differences between our and the reference's final weights (all tensors named `prefix.name`).

    Elements of trained tensors are split by the gradients of our run: `conditioned` had |gradient| >= GRAD_FLOOR at
    every step, `untouched` had exactly zero gradient at every step (e.g. embedding rows of unused tokens: only weight
    decay moves them), and the rest had a gradient at rounding level at some step. `cond_diff` is the largest
    difference over the first two kinds; `max_diff` over all elements."""
    assert set(ours) == set(reference), f"tensor names differ: {sorted(set(ours) ^ set(reference))[:5]}"
    out = dict(max_diff=0.0, worst="", cond_diff=0.0, cond_worst="", moved=0.0, conditioned=0, untouched=0,
               trained=0, noisy_tensors=[])
    for key, ref in reference.items():
        diff = (ours[key].float() - ref.float()).abs()
        out["moved"] = max(out["moved"], (ref.float() - initial[key].float()).abs().max().item())
        if diff.max().item() > out["max_diff"]:
            out["max_diff"], out["worst"] = diff.max().item(), key
        if key not in grads:  # a buffer, or a module that was not trained
            continue
        low, high = grads[key]
        conditioned, untouched = low >= GRAD_FLOOR, high == 0
        out["trained"] += diff.numel()
        out["conditioned"] += int(conditioned.sum())
        out["untouched"] += int(untouched.sum())
        if not conditioned.any():
            out["noisy_tensors"].append(key)
        checked = conditioned | untouched
        if checked.any() and diff[checked].max().item() > out["cond_diff"]:
            out["cond_diff"], out["cond_worst"] = diff[checked].max().item(), key
    return out


def prefixed(prefix: str, tensors: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


@torch.no_grad()
def posterior_differences(bundle, run, instance: Path, classes: Path) -> tuple[float, float]:
    """Max |difference| between the posteriors (mean, std) the reference sampled each step and ours, computed
    (1) as the reference does, encoding each step's images as one batch: checks our image loading, ordering, pairing
    and to_training_tensor; (2) as train() does, one image at a time: the rounding our latent cache introduces."""
    from trainer.dataset import load_image_folder, to_training_tensor

    def pixels(folder):
        return [to_training_tensor(item.image, RESOLUTION) for item in load_image_folder(folder)]

    def stats(dist):
        return torch.cat([dist.mean, dist.std])

    inst, cls = pixels(instance), pixels(classes)
    single = {}
    batched_worst = single_worst = 0.0
    for items, mean, std in zip(run.step_items(), run.tensors_of_kind("posterior_mean"),
                                run.tensors_of_kind("posterior_std")):
        keys = [("i", i % len(inst)) for i in items] + [("c", i % len(cls)) for i in items]
        batch = torch.stack([(inst if kind == "i" else cls)[j] for kind, j in keys])
        reference = torch.cat([mean, std])
        batched_worst = max(batched_worst, (stats(bundle.vae.encode(batch).latent_dist) - reference).abs().max().item())
        for key, pix in zip(keys, batch):
            if key not in single:
                single[key] = bundle.vae.encode(pix[None]).latent_dist
        ours = torch.cat([torch.cat([single[k].mean for k in keys]), torch.cat([single[k].std for k in keys])])
        single_worst = max(single_worst, (ours - reference).abs().max().item())
    return batched_worst, single_worst


@needs_reference
@pytest.mark.slow
@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["te_frozen", "te_trained"])
def test_weights_match_the_reference_script(inputs, reference_runs, train_text_encoder, tmp_path):
    from trainer.config import TrainConfig
    from trainer.loop import train

    root, instance, classes, model = inputs
    run = reference_runs(train_text_encoder)

    # The reference did what we think it did: its dataset, its draws, one log per step.
    dataset = run.of_kind("dataset")[0]
    assert dataset["length"] == NUM_ITEMS and dataset["instance"] == list(INSTANCE_PHOTOS)
    run.check_draw_pattern(STEPS, NUM_ITEMS)
    assert len(run.losses) == STEPS

    bundle = initial_bundle(model)
    initial = {**prefixed("unet", state(bundle.unet)), **prefixed("text_encoder", state(bundle.text_encoder))}
    prompt_ids = bundle.tokenizer(["a zwx dog", "a dog"], padding="max_length", truncation=True,
                                  max_length=bundle.tokenizer.model_max_length).input_ids
    assert prompt_ids == [run.prompt_ids["instance"], run.prompt_ids["class"]], "tokenizers disagree"
    batched_diff, latent_diff = posterior_differences(bundle, run, instance, classes)

    replay = ReplayRandomness(run)
    grads = record_gradient_range({"unet": bundle.unet, "text_encoder": bundle.text_encoder})
    cfg = TrainConfig(base_model="tiny-sd1 (reference equivalence)", instance_dir=str(instance),
                      class_dir=str(classes), identifier="zwx", class_noun="dog",
                      output=str(tmp_path / "zwx-dog.safetensors"), resolution=RESOLUTION, batch_size=1,
                      max_train_steps=STEPS, learning_rate=LEARNING_RATE, lr_scheduler="constant", lr_warmup_steps=0,
                      with_prior_preservation=True, prior_loss_weight=1.0, num_class_images=len(CLASS_SIZES),
                      train_text_encoder=train_text_encoder, optimizer="adamw", mixed_precision="no",
                      attention="sdpa", adam_weight_decay=1e-2, max_grad_norm=1.0, seed=0, device="cpu",
                      resume=False)
    result = train(cfg, bundle=bundle, randomness=replay)

    ours = {**prefixed("unet", state(bundle.unet)), **prefixed("text_encoder", state(bundle.text_encoder))}
    reference = {**prefixed("unet", run.unet_state()), **prefixed("text_encoder", run.text_encoder_state())}
    unet = compare({k: v for k, v in ours.items() if k.startswith("unet.")},
                   {k: v for k, v in reference.items() if k.startswith("unet.")}, initial, grads)
    text = compare({k: v for k, v in ours.items() if k.startswith("text_encoder.")},
                   {k: v for k, v in reference.items() if k.startswith("text_encoder.")}, initial, grads)

    print(f"\n[{'te_trained' if train_text_encoder else 'te_frozen'}] {STEPS} steps, lr {LEARNING_RATE}, "
          f"posteriors max |ours - ref|: batched as the reference {batched_diff:.2e}, per image as train() "
          f"{latent_diff:.2e}")
    for step, (a, b) in enumerate(zip(result.losses, run.losses), 1):
        print(f"  step {step}: loss ours {a:.9f} reference {b:.9f} diff {abs(a - b):.2e}")
    for name, c in (("unet", unet), ("text encoder", text)):
        print(f"  {name}: max |ours - ref| {c['max_diff']:.2e} ({c['worst']}); on conditioned + untouched elements "
              f"({c['conditioned']} + {c['untouched']} of {c['trained']}) {c['cond_diff']:.2e} ({c['cond_worst']}); "
              f"max movement from init {c['moved']:.2e}; tensors with no conditioned element: "
              f"{len(c['noisy_tensors'])} {c['noisy_tensors'][:3]}{'...' if len(c['noisy_tensors']) > 3 else ''}")

    # Same randomness, consumed in the same order, all of it.
    assert replay.calls == run.draw_sequence(), "train() asked for draws in another order than the reference made"
    assert replay.unused() == {}, f"reference draws train() never used: {replay.unused()}"
    assert batched_diff <= PIXEL_PATH_ATOL, f"our images -> posteriors differ from the reference by {batched_diff:.2e}"
    assert latent_diff <= LATENT_ATOL, f"our cached posteriors differ from the reference by {latent_diff:.2e}"
    assert len(result.losses) == STEPS
    for step, (a, b) in enumerate(zip(result.losses, run.losses), 1):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {step}: loss {a!r} vs the reference's {b!r}"

    trained = [unet] + ([text] if train_text_encoder else [])
    for c in trained:
        assert c["moved"] >= MIN_MOVEMENT, f"the reference barely moved ({c['moved']:.2e}): the check is toothless"
        assert c["conditioned"] >= MIN_CONDITIONED * (c["trained"] - c["untouched"]), (
            f"only {c['conditioned']} of {c['trained'] - c['untouched']} elements with a gradient had gradients >= "
            f"{GRAD_FLOOR} at every step")
        assert c["cond_diff"] <= WEIGHT_ATOL, f"{c['cond_worst']} differs from the reference by {c['cond_diff']:.2e}"
        assert c["max_diff"] <= ADAM_BOUND, f"{c['worst']} differs from the reference by {c['max_diff']:.2e}"
    if not train_text_encoder:
        assert text["max_diff"] == 0.0 and text["moved"] == 0.0, "the frozen text encoder changed"


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
