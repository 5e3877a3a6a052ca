"""What the UNet is given besides the noisy latents, per family.

SD1/SD2: the text encoder's last hidden states. SDXL, as it was trained (and as diffusers' StableDiffusionXLPipeline
encodes): both encoders' penultimate hidden states side by side, the second encoder's projected final token as the
pooled embedding, and six "time ids" saying how the training image was made: its original size, where it was
cropped, and the target size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bundle import ModelBundle


@dataclass
class Conditioning:
    states: torch.Tensor  # [n, 77, width]: cross-attention context
    pooled: torch.Tensor | None = None  # [n, width_2]: SDXL's pooled text embedding

    def rows(self, rows: list[int]) -> "Conditioning":
        return Conditioning(self.states[rows], None if self.pooled is None else self.pooled[rows])

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(self.states.to(*args, **kwargs),
                            None if self.pooled is None else self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        pooled = [part.pooled for part in parts]
        return Conditioning(torch.cat([part.states for part in parts]),
                            None if pooled[0] is None else torch.cat(pooled))

    def unet_kwargs(self, time_ids: torch.Tensor | None = None) -> dict:
        """Keyword arguments for UNet2DConditionModel.forward; SDXL also needs each row's time ids ([n, 6])."""
        if self.pooled is None:
            return {"encoder_hidden_states": self.states}
        if time_ids is None:
            raise ValueError("an SDXL UNet needs the time ids (original size, crop, target size) of every row")
        return {"encoder_hidden_states": self.states,
                "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": time_ids.to(self.pooled)}}


def tokenize(bundle: ModelBundle, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids of each prompt for each of the bundle's tokenizers, padded to 77."""
    return [tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids for tokenizer in bundle.tokenizers]


def encode(bundle: ModelBundle, ids: list[torch.Tensor]) -> Conditioning:
    """The text conditioning of tokenized prompts (with gradients if the encoders are being trained)."""
    if not bundle.spec.is_xl:
        encoder = bundle.text_encoder
        return Conditioning(encoder(ids[0].to(encoder.device))[0])
    states = []
    for encoder, encoder_ids in zip(bundle.text_encoders, ids, strict=True):
        output = encoder(encoder_ids.to(encoder.device), output_hidden_states=True)
        states.append(output.hidden_states[-2])
    return Conditioning(torch.cat(states, dim=-1), output.text_embeds)


def encode_prompts(bundle: ModelBundle, prompts: list[str]) -> Conditioning:
    return encode(bundle, tokenize(bundle, prompts))


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
             target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning of one image, (height, width) pairs: [orig_h, orig_w, top, left, target_h, target_w]."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
