"""Memory presets: named bundles of the memory levers, for people who know their card, not the levers.

Each preset is the fastest bundle that fits a card of its size. bf16_weights needs bf16 compute (NVIDIA Ampere, RTX
30xx, and newer), and fused_backward cannot work with fp16's loss scaling. So on GPUs without native bf16 (GTX 10xx,
RTX 20xx, T4, V100) each preset falls back to fp16 compute without either, except "8 GB", which computes in fp32 to
keep fused_backward (without it, fp32 weights and all their gradients would not fit).
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
PRESETS: dict[str, tuple[dict, dict]] = {
    # The weights in bf16, stepped tensor by tensor in the backward pass: 2 bytes a parameter for the weight and 2 for
    # the 8-bit moments, and no whole-model gradients (one tensor's at a time).
    "8 GB": (dict(_LEAN, mixed_precision="bf16", fused_backward=True, bf16_weights=True),
             dict(_LEAN, mixed_precision="no", fused_backward=True, bf16_weights=False)),
    # fp32 weights (no rounding of small updates at all), still fused and checkpointed.
    "12 GB": (dict(_LEAN, mixed_precision="bf16", fused_backward=True, bf16_weights=False),
              dict(_LEAN, mixed_precision="fp16", fused_backward=False, bf16_weights=False)),
    # Fastest: no recomputation, full-precision moments, the ordinary (multi-tensor) optimizer step.
    "24 GB+": (dict(_FAST, mixed_precision="bf16"), dict(_FAST, mixed_precision="fp16")),
}

# SDXL at 1024 px (figures: README's memory table, bench/memory_model.py --family sdxl --shapes-only). Its fp32 weights
# alone are 9.6 GiB and 8-bit AdamW's moments 4.8 GiB more, so on 12 and 16 GB cards the weights are bf16 (stochastic
# rounding) and the optimizer is Adafactor without a first moment (0.91 GiB of state for the UNet, 0.006 for both text
# encoders). Gradient checkpointing everywhere: without it one step's activations at 1024 px are 16 GiB. The fastest
# that fits 24 GB keeps fp32 weights (no rounding kernels) and 8-bit AdamW (one kernel a tensor), stepped in the
# backward pass (the UNet's fp32 gradients would be 9.6 GiB more). Without bf16 (fp32 compute, fused; fp16 could not be
# fused) the fp32 weights do not fit 12 GB: the leanest there is on such cards.
_XL_LEAN = dict(gradient_checkpointing=True, optimizer="adafactor", fused_backward=True)
_XL_FAST = dict(gradient_checkpointing=True, optimizer="adamw8bit", fused_backward=True, bf16_weights=False)
XL_PRESETS: dict[str, tuple[dict, dict]] = {
    # SDXL has no 8 GB preset of its own (its bf16 weights are 6.4 GiB): "8 GB" means the leanest, as "12 GB".
    "8 GB": (dict(_XL_LEAN, mixed_precision="bf16", bf16_weights=True),
             dict(_XL_LEAN, mixed_precision="no", bf16_weights=False)),
    "12 GB": (dict(_XL_LEAN, mixed_precision="bf16", bf16_weights=True),
              dict(_XL_LEAN, mixed_precision="no", bf16_weights=False)),
    "24 GB+": (dict(_XL_FAST, mixed_precision="bf16"), dict(_XL_FAST, mixed_precision="no")),
}
FAMILY_PRESETS = {"sdxl": XL_PRESETS}
PRESET_NAMES = ("auto", "custom", *PRESETS)
GIB = 2 ** 30


def preset_for_memory(total_bytes: int) -> str:
    """The preset "auto" picks for a card with this much memory (an "8 GB" card reports a little under 8 GiB)."""
    if total_bytes >= 20 * GIB:
        return "24 GB+"
    return "12 GB" if total_bytes >= 11 * GIB else "8 GB"


def presets_for(family: str | None) -> dict[str, tuple[dict, dict]]:
    """The presets' levers for a model family ("sd1", "sd2", "sdxl"; None: SD 1.x / 2.x)."""
    return FAMILY_PRESETS.get(family or "", PRESETS)


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
    with_bf16, without_bf16 = presets_for(family)[name]
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
