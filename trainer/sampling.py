"""Text-to-image sampling from a ModelBundle: previews during training and class-prior images.

Every image gets its own CPU torch.Generator seeded with its own seed, so its pixels depend only on its prompt,
seed and settings, not on the batch it was generated in nor on the device (CPU noise is the same everywhere).
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from PIL import Image

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)

from .bundle import ModelBundle
from .phases import borrowed

# Sampler name -> scheduler class and the settings that make it the sampler users know by that name.
SAMPLERS = {
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),  # as in SD's own scheduler config
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}

# StableDiffusionPipeline itself refuses sizes that are not multiples of 8.
PIPELINE_SIZE_MULTIPLE = 8


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")


def make_scheduler(bundle: ModelBundle, sampler: str):
    """A fresh inference scheduler built from the bundle's training schedule (keeps betas and prediction type)."""
    _check_sampler(sampler)
    scheduler_class, overrides = SAMPLERS[sampler]
    return scheduler_class.from_config(bundle.noise_scheduler.config, **overrides)


def size_multiple(bundle: ModelBundle) -> int:
    """Image sides must be multiples of this: the VAE's downscale times every UNet downsampling.

    64 for SD1/SD2 (8x VAE, three 2x UNet downsamplings). Other sizes would need the UNet to resize
    skip connections, which SD was never trained with.
    """
    unet_factor = 2 ** bundle.unet.num_upsamplers
    return math.lcm(bundle.vae_scale_factor * unet_factor, PIPELINE_SIZE_MULTIPLE)


def native_size(bundle: ModelBundle) -> int:
    """The image size the model was made for: 512 for SD 1.5, 768 for SD 2.1-768, 32 for the toy model."""
    return bundle.unet.config.sample_size * bundle.vae_scale_factor


def validate_settings(bundle: ModelBundle, *, width: int, height: int, steps: int, sampler: str) -> None:
    """Raise ValueError with an actionable message for settings sampling cannot use."""
    _check_sampler(sampler)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    multiple = size_multiple(bundle)
    for name, value in (("width", width), ("height", height)):
        if value < multiple or value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            raise ValueError(f"{name} must be a positive multiple of {multiple} for this model, got {value} "
                             f"(nearest allowed: {nearest}).")


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextmanager
def _on_device_for_sampling(bundle: ModelBundle, device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Eval mode on `device` (as `dtype` when given) for the duration, then each (sub)module's own tensors and train
    flag again, untouched. Modules already there in that dtype are used without a copy; the VAE decodes one image at
    a time (a batch's decode is the peak of sampling)."""
    modules = (bundle.unet, bundle.vae, bundle.text_encoder)
    flags = [(m, m.training) for module in modules for m in module.modules()]
    slicing = bundle.vae.use_slicing
    with ExitStack() as stack:
        for module in modules:
            stack.enter_context(borrowed(module, device, dtype))
        try:
            for module in modules:
                module.eval()
            bundle.vae.use_slicing = True
            yield
        finally:
            bundle.vae.use_slicing = slicing
            for m, training in flags:
                m.training = training


def _pipeline(bundle: ModelBundle, sampler: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=make_scheduler(bundle, sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_images(
    bundle: ModelBundle,
    prompts: list[str],
    *,
    seeds: list[int],
    negative_prompt: str = "",
    steps: int = 30,
    guidance: float = 7.5,
    width: int = 512,
    height: int = 512,
    sampler: str = "euler_a",
    batch_size: int = 4,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
    on_image: Callable[[int, Image.Image], None] | None = None,
) -> list[Image.Image]:
    """One RGB image per (prompt, seed) pair, generated batch_size at a time.

    Runs on `device` (default: where the UNet is) with the weights as `dtype` (default: as they are), borrowed for
    the call: afterwards every module has its own tensors and train/eval mode again. `autocast`: compute in that
    dtype (for modules of mixed dtypes, e.g. a trained fp32 UNet beside a half-precision VAE). on_image(index,
    image) is called as each image is ready, so callers can report progress or save it before the next batch.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"Need one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    validate_settings(bundle, width=width, height=height, steps=steps, sampler=sampler)
    device = torch.device(device) if device is not None else _module_device(bundle.unet)

    pipe = _pipeline(bundle, sampler)
    images: list[Image.Image] = []
    # Without autocast's cache: it would keep a low-precision copy of every trained (grad-requiring) weight for the whole
    # call, 1.8 GiB beside an fp32 SD 1.5 being trained, for weights each used once per step.
    compute = torch.autocast(device.type, dtype=autocast, cache_enabled=False) if autocast else nullcontext()
    with _on_device_for_sampling(bundle, device, dtype), torch.no_grad(), compute:
        for start in range(0, len(prompts), batch_size):
            batch_prompts = prompts[start:start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds[start:start + batch_size]]
            batch = pipe(
                prompt=batch_prompts,
                negative_prompt=[negative_prompt] * len(batch_prompts),
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=generators,
                output_type="pil",
            ).images
            for image in batch:
                image = image.convert("RGB")
                if on_image is not None:
                    on_image(len(images), image)
                images.append(image)
    return images


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Images laid out row by row, cols per row, in cells the size of the first image."""
    if not images or cols < 1:
        raise ValueError("image_grid needs at least one image and cols >= 1.")
    width, height = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (min(cols, len(images)) * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((width, height)), ((index % cols) * width, (index // cols) * height))
    return grid
