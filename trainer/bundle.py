"""ModelBundle: the diffusers modules a DreamBooth run needs, as one object (loaded by trainer/models.py, written by
trainer/checkpoint.py; neither imports the other for it)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class ModelBundle:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    family: str  # "sd1" or "sd2"
    source_name: str = ""  # file or folder name of the base model
    source_hash: str = ""  # sha256 of the base model file ("" when unknown)
    # Tensors of the base single-file checkpoint that diffusers does not use (e.g. SD2's last OpenCLIP layer),
    # written back unchanged on export so the result is as complete as the file it came from.
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)
