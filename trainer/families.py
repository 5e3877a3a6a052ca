"""What differs between the model families the pack trains (SD 1.x, SD 2.x, SDXL), in one table.

The rest of the engine asks the family instead of testing its name: how many text encoders, where each lives in a
single-file checkpoint and in which layout, the size the model was made for, how ModelSpec names it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class TextEncoderSlot:
    prefix: str  # where its weights live in a single-file (LDM-layout) checkpoint
    open_clip: bool  # stored in OpenCLIP's layout (resblocks, fused q/k/v) rather than transformers' CLIP layout
    folder: str  # its subfolder in a diffusers folder: text_encoder / text_encoder_2
    tokenizer: str  # its tokenizer's subfolder
    projection: bool = False  # a CLIPTextModelWithProjection: its projected final token is SDXL's pooled embedding


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2", "sdxl"
    title: str  # what a user reads
    text_encoders: tuple[TextEncoderSlot, ...]
    implementation: str  # ModelSpec's modelspec.implementation

    @property
    def config_dir(self) -> Path:
        """Its configs and tokenizers in diffusers' folder layout (also what from_single_file(config=...) takes)."""
        return CONFIG_DIR / self.name

    @property
    def is_xl(self) -> bool:
        """Two text encoders, a pooled embedding and size/crop conditioning (SDXL's micro-conditioning)."""
        return len(self.text_encoders) == 2

    def architecture(self, prediction_type: str) -> str:
        """ModelSpec's modelspec.architecture for a model of this family."""
        if self.name == "sd1":
            return "stable-diffusion-v1"
        if self.name == "sd2":
            return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
        return "stable-diffusion-xl-v1-base"


SD1 = Family("sd1", "SD 1.x",
             (TextEncoderSlot("cond_stage_model.transformer.text_model.", False, "text_encoder", "tokenizer"),),
             "https://github.com/CompVis/stable-diffusion")
SD2 = Family("sd2", "SD 2.x",
             (TextEncoderSlot("cond_stage_model.model.", True, "text_encoder", "tokenizer"),),
             "https://github.com/Stability-AI/stablediffusion")
SDXL = Family("sdxl", "SDXL",
              (TextEncoderSlot("conditioner.embedders.0.transformer.text_model.", False, "text_encoder", "tokenizer"),
               TextEncoderSlot("conditioner.embedders.1.model.", True, "text_encoder_2", "tokenizer_2", projection=True)),
              "https://github.com/Stability-AI/generative-models")

FAMILIES = {family.name: family for family in (SD1, SD2, SDXL)}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; one of {sorted(FAMILIES)}") from None
