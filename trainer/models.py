"""Model bundle: the diffusers modules a DreamBooth run needs, and how to build them offline."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CONFIG_DIR = Path(__file__).parent / "configs"
TOKENIZER_DIR = CONFIG_DIR / "clip_tokenizer"

# SD1's CLIP-L pads with <|endoftext|>; SD2's OpenCLIP-H pads with "!" (id 0), as its original code did.
PAD_TOKEN = {"sd1": "<|endoftext|>", "sd2": "!"}
PREDICTION_TYPES = ("epsilon", "v_prediction")


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


def load_tokenizer(family: str) -> CLIPTokenizer:
    """The CLIP BPE tokenizer shipped with the pack (identical for SD1 and SD2 apart from padding)."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=PAD_TOKEN[family])


def make_noise_scheduler(prediction_type: str) -> DDPMScheduler:
    """The training-time noise schedule every SD1/SD2 checkpoint was trained with."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_bundle(family: str, prediction_type: str, unet_config: dict, vae_config: dict, text_config: dict,
                 source_name: str = "", source_hash: str = "") -> ModelBundle:
    """Modules with freshly initialised weights, shaped by the given diffusers/transformers configs."""
    return ModelBundle(
        unet=UNet2DConditionModel.from_config(unet_config),
        vae=AutoencoderKL.from_config(vae_config),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        tokenizer=load_tokenizer(family),
        noise_scheduler=make_noise_scheduler(prediction_type),
        family=family,
        source_name=source_name,
        source_hash=source_hash,
    )
