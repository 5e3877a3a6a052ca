"""Memory presets: named bundles of the memory levers, for people who know their card, not the levers.

They only choose among the levers; "custom" leaves the individual settings as given.
fused_backward is in none of them: their precision is "auto", which is fp16 on GPUs without bf16 (GTX 10xx, RTX 20xx,
T4), and fused_backward refuses fp16.
"""
from __future__ import annotations

import dataclasses

from .config import ConfigError, TrainConfig

PRESETS: dict[str, dict] = {
    # Every saving on: checkpointed activations, 8-bit moments, half-precision compute, frozen text encoder.
    "8 GB": dict(gradient_checkpointing=True, optimizer="adamw8bit", mixed_precision="auto",
                 train_text_encoder=False, attention="sdpa"),
    # Room for the text encoder's training too, still with checkpointing and 8-bit moments.
    "12 GB": dict(gradient_checkpointing=True, optimizer="adamw8bit", mixed_precision="auto", attention="sdpa"),
    # Fastest: no recomputation, full-precision optimizer moments.
    "24 GB+": dict(gradient_checkpointing=False, optimizer="adamw", mixed_precision="auto", attention="sdpa"),
}
PRESET_NAMES = ("custom", *PRESETS)


def apply_preset(cfg: TrainConfig, name: str) -> TrainConfig:
    if name == "custom":
        return cfg
    if name not in PRESETS:
        raise ConfigError(f"memory preset: {name!r} is not one of {', '.join(PRESET_NAMES)}")
    return dataclasses.replace(cfg, **PRESETS[name])
