"""Text-to-image sampling from a ModelBundle: previews during training, class-prior images, `python -m trainer sample`.

SD 1.x/2.x draw with diffusers' StableDiffusionPipeline, SDXL with its StableDiffusionXLPipeline (both text encoders,
the pooled embedding, and size conditioning saying the image was made at its own size, uncropped). The pipeline only
denoises; the VAE then decodes one image at a time, so a batch's decode is never the peak. SDXL's VAE overflows in
half precision (diffusers' force_upcast), so it decodes in fp32, also when the rest runs in half precision.

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
    StableDiffusionXLPipeline,
)
from diffusers.image_processor import VaeImageProcessor

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


def decodes_in_fp32(bundle: ModelBundle) -> bool:
    """SDXL's VAE overflows in fp16 (diffusers' force_upcast), so it decodes in fp32 whatever the rest draws in.
    (diffusers sets force_upcast on every AutoencoderKL config by default; only its SDXL pipelines read it.)"""
    return bundle.spec.is_xl and bundle.vae.config.force_upcast


def vae_dtype(bundle: ModelBundle, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the VAE decodes in when the rest of the model draws in `dtype` (None: as its weights are)."""
    return torch.float32 if decodes_in_fp32(bundle) else dtype


@contextmanager
def _on_device_for_sampling(bundle: ModelBundle, device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Eval mode on `device` (as `dtype` when given; the VAE as vae_dtype) for the duration, then each (sub)module's
    own tensors and train flag again, untouched. Modules already there in that dtype are used without a copy."""
    flags = [(m, m.training) for module in bundle.modules for m in module.modules()]
    with ExitStack() as stack:
        for module in bundle.modules:
            stack.enter_context(borrowed(module, device, vae_dtype(bundle, dtype) if module is bundle.vae else dtype))
        try:
            for module in bundle.modules:
                module.eval()
            yield
        finally:
            for m, training in flags:
                m.training = training


def _pipeline(bundle: ModelBundle, sampler: str) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The family's diffusers pipeline over the bundle's modules (it only denoises: see _decode)."""
    scheduler = make_scheduler(bundle, sampler)
    if bundle.spec.is_xl:
        pipe = StableDiffusionXLPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoder, text_encoder_2=bundle.text_encoder_2,
            tokenizer=bundle.tokenizer, tokenizer_2=bundle.tokenizer_2, unet=bundle.unet, scheduler=scheduler,
            add_watermarker=False)  # (diffusers' default adds one when invisible-watermark is installed)
    else:
        pipe = StableDiffusionPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _size_conditioning(bundle: ModelBundle, width: int, height: int) -> dict:
    """SDXL's micro-conditioning for an image made at its own size, uncropped (diffusers' defaults, said here)."""
    if not bundle.spec.is_xl:
        return {}
    return {"original_size": (height, width), "target_size": (height, width), "crops_coords_top_left": (0, 0)}


def _decode(bundle: ModelBundle, latents: torch.Tensor, compute) -> Iterator[Image.Image]:
    """The pipeline's decode, one image at a time: in `compute` (the caller's autocast) for SD 1.x/2.x; for SDXL in
    fp32 with autocast off, as its VAE was borrowed in vae_dtype."""
    vae = bundle.vae
    processor = VaeImageProcessor(vae_scale_factor=bundle.vae_scale_factor)
    for latent in latents:
        with torch.autocast(latent.device.type, enabled=False) if decodes_in_fp32(bundle) else compute:
            pixels = vae.decode(latent[None].to(vae.dtype) / vae.config.scaling_factor).sample
        yield processor.postprocess(pixels, output_type="pil")[0].convert("RGB")


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
    with _on_device_for_sampling(bundle, device, dtype), torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch_prompts = prompts[start:start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds[start:start + batch_size]]
            with compute:
                latents = pipe(
                    prompt=batch_prompts,
                    negative_prompt=[negative_prompt] * len(batch_prompts),
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    width=width,
                    height=height,
                    generator=generators,
                    output_type="latent",
                    **_size_conditioning(bundle, width, height),
                ).images
            for image in _decode(bundle, latents, compute):
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
