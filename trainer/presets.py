"""Memory presets: named bundles of the memory levers, for people who know their card, not the levers.

Each preset is the fastest bundle that fits a card of its size. bf16_weights needs bf16 compute (NVIDIA Ampere, RTX
30xx, and newer), and fused_backward cannot work with fp16's loss scaling. So on GPUs without native bf16 (GTX 10xx,
RTX 20xx, T4, V100) each preset falls back to fp16 compute without either, except "6 GB" and "8 GB", which compute in
fp32 to keep fused_backward (without it, fp32 weights and all their gradients would not fit).
"auto" picks the preset from the card's memory; "custom" leaves the individual settings as given.

The levers depend on the model family where its size demands it: SDXL's UNet has 2.6 B parameters (SD 1.5's 0.86 B),
so its presets are their own (XL_PRESETS), chosen by measurement at 1024 px (bench/memory_model.py --family sdxl,
tests/test_memory_budget.py). Families without presets of their own (SD 1.x, SD 2.x) use PRESETS.
No torch here: the ComfyUI node reads PRESET_NAMES when it registers.
"""
from __future__ import annotations

import dataclasses

from .config import ConfigError, TrainConfig

_LEAN = dict(gradient_checkpointing=True, optimizer="adamw8bit")
_FAST = dict(gradient_checkpointing=False, optimizer="adamw", fused_backward=False, bf16_weights=False)

# name -> (levers on a GPU with bf16, levers on one without). The text encoder's training and the attention kernel
# (SDPA and xformers are both memory-efficient) stay the user's choice.
# The weights in bf16, stepped tensor by tensor in the backward pass: 2 bytes a parameter for the weight and 2 for the
# 8-bit moments, and no whole-model gradients (one tensor's at a time). With bf16, SD 1.5's whole run with the text
# encoder trained peaks at 4.50 GiB allocated, 5.05 reserved by estimate (its training step; bench/memory_model.py
# --whole-run --gpu-memory 5.8): it fits a 6 GB card's 5.3 as it is, so "6 GB" is these levers too. (Adafactor, the
# lever that makes SDXL small, does not help here: its factored moments of SD 1.5's convolution weights are 2/3 of
# their size in fp32, 1.99 GiB of state against 8-bit AdamW's 1.83.)
_SMALLEST = (dict(_LEAN, mixed_precision="bf16", fused_backward=True, bf16_weights=True),
             dict(_LEAN, mixed_precision="no", fused_backward=True, bf16_weights=False))
PRESETS: dict[str, tuple[dict, dict]] = {
    "6 GB": _SMALLEST,  # with bf16 (RTX 30xx laptops and newer); without, nothing of SD 1.5's full fine-tune fits
    "8 GB": _SMALLEST,
    # fp32 weights (no rounding of small updates at all), still fused and checkpointed.
    "12 GB": (dict(_LEAN, mixed_precision="bf16", fused_backward=True, bf16_weights=False),
              dict(_LEAN, mixed_precision="fp16", fused_backward=False, bf16_weights=False)),
    # Fastest: no recomputation, full-precision moments, the ordinary (multi-tensor) optimizer step.
    "24 GB+": (dict(_FAST, mixed_precision="bf16"), dict(_FAST, mixed_precision="fp16")),
}

# SDXL at 1024 px (figures: README's memory table, bench/memory_model.py --family sdxl --shapes-only). Its fp32 weights
# alone are 9.6 GiB and 8-bit AdamW's moments 4.8 GiB more, so on 12 and 16 GB cards the weights are bf16 (stochastic
# rounding) and the optimizer is Adafactor without a first moment (0.91 GiB of state for the UNet, 0.006 for both text
# encoders). Gradient checkpointing everywhere: without it the forward pass leaves 16.2 GiB of activations at 1024 px.
# What we expect fastest of what fits 24 GB (not yet timed on a GPU) keeps fp32 weights (no rounding kernels) and 8-bit
# AdamW (one kernel a tensor), stepped in the backward pass (the UNet's fp32 gradients would be 9.6 GiB more). Without bf16 (fp32 compute, fused; fp16 could not be
# fused) the fp32 weights do not fit 12 GB: the leanest there is on such cards.
_XL_LEAN = dict(gradient_checkpointing=True, optimizer="adafactor", fused_backward=True)
_XL_FAST = dict(gradient_checkpointing=True, optimizer="adamw8bit", fused_backward=True, bf16_weights=False)
_XL_SMALLEST = (dict(_XL_LEAN, mixed_precision="bf16", bf16_weights=True),
                dict(_XL_LEAN, mixed_precision="no", bf16_weights=False))
XL_PRESETS: dict[str, tuple[dict, dict]] = {
    # SDXL has no 6 or 8 GB preset of its own (its bf16 weights are 6.3 GiB, class images take 9.6): they mean the
    # leanest, as "12 GB".
    "6 GB": _XL_SMALLEST,
    "8 GB": _XL_SMALLEST,
    "12 GB": _XL_SMALLEST,
    "24 GB+": (dict(_XL_FAST, mixed_precision="bf16"), dict(_XL_FAST, mixed_precision="no")),
}
# With both text encoders trained (3.4 B parameters), fp32 weights and 8-bit AdamW are 20.9 GiB at the step's peak (est.
# 23.0 reserved): no room on a 24 GB card. Its bf16 weights with 8-bit AdamW are 14.9 (16.4).
XL_PRESETS_TEXT_ENCODERS = {
    "24 GB+": (dict(_XL_FAST, mixed_precision="bf16", bf16_weights=True),
               dict(_XL_LEAN, mixed_precision="no", bf16_weights=False)),
}
FAMILY_PRESETS = {"sdxl": XL_PRESETS}
FAMILY_PRESETS_TEXT_ENCODERS = {"sdxl": XL_PRESETS_TEXT_ENCODERS}  # where training the text encoders changes them
PRESET_NAMES = ("auto", "custom", *PRESETS)
GIB = 2 ** 30


def preset_for_memory(total_bytes: int) -> str:
    """The preset "auto" picks for a card with this much memory (an "8 GB" card reports a little under 8 GiB)."""
    if total_bytes >= 20 * GIB:
        return "24 GB+"
    if total_bytes >= 11 * GIB:
        return "12 GB"
    return "8 GB" if total_bytes >= 7 * GIB else "6 GB"


def presets_for(family: str | None, train_text_encoder: bool = False) -> dict[str, tuple[dict, dict]]:
    """The presets' levers for a model family ("sd1", "sd2", "sdxl"; None: SD 1.x / 2.x), with or without its text
    encoders trained."""
    presets = FAMILY_PRESETS.get(family or "", PRESETS)
    if train_text_encoder:
        presets = {**presets, **FAMILY_PRESETS_TEXT_ENCODERS.get(family or "", {})}
    return presets


def apply_preset(cfg: TrainConfig, name: str, has_bf16: bool, total_memory: int | None = None,
                 family: str | None = None) -> TrainConfig:
    """`cfg` with the levers of preset `name` for a model of `family` on a device with (or without) native bf16 and
    `total_memory` bytes (None: not a GPU, where "auto" keeps the settings as given)."""
    name = _canonical(name)
    if name == "auto":
        if total_memory is None:
            return cfg
        name = preset_for_memory(total_memory)
    if name == "custom":
        return cfg
    with_bf16, without_bf16 = presets_for(family, cfg.train_text_encoder)[name]
    return dataclasses.replace(cfg, memory_preset=name, **(with_bf16 if has_bf16 else without_bf16))


def short_name(name: str) -> str:
    """How a preset may be typed where spaces and "+" get in the way: "8 GB" -> "8GB", "24 GB+" -> "24GB"."""
    return name.replace(" ", "").rstrip("+")


def _canonical(name: str) -> str:
    """The preset's own spelling of `name`, which may differ in case, spaces and the "+" ("24gb" on a command line)."""
    found = {short_name(n).lower(): n for n in PRESET_NAMES}.get(short_name(name).lower())
    if found is None:
        raise ConfigError(f"memory_preset: {name!r} is not one of {', '.join(repr(n) for n in PRESET_NAMES)}")
    return found


def describe_levers(cfg: TrainConfig) -> str:
    """One line naming the levers in effect, for the run's log."""
    parts = [f"precision {cfg.mixed_precision}", f"optimizer {cfg.optimizer}",
             *(name.replace("_", " ") for name in ("gradient_checkpointing", "fused_backward", "bf16_weights",
                                                  "channels_last", "compile_unet") if getattr(cfg, name)),
             "text encoder trained" if cfg.train_text_encoder else "text encoder frozen"]
    return ", ".join(parts)
