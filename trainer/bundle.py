"""ModelBundle: the diffusers modules a DreamBooth run needs, as one object (loaded by trainer/models.py, written by
trainer/checkpoint.py; neither imports the other for it)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .families import Family
from .families import family as family_named


@dataclass
class ModelBundle:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    family: str  # "sd1", "sd2" or "sdxl"
    source_name: str = ""  # file or folder name of the base model
    source_hash: str = ""  # sha256 of the base model file ("" when unknown)
    # Tensors of the base single-file checkpoint that diffusers does not use (e.g. SD2's last OpenCLIP layer),
    # written back unchanged on export so the result is as complete as the file it came from.
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)
    # SDXL's second text encoder (OpenCLIP ViT-bigG, with the projection that makes its pooled embedding).
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def spec(self) -> Family:
        return family_named(self.family)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])

    @property
    def modules(self) -> list[torch.nn.Module]:
        """Every module with weights: UNet, VAE, then the text encoders."""
        return [self.unet, self.vae, *self.text_encoders]

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def zero_terminal_snr(self) -> bool:
        """Trained with a noise schedule rescaled to zero terminal SNR (some SDXL v-prediction descendants)."""
        return bool(self.noise_scheduler.config.get("rescale_betas_zero_snr", False))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)
