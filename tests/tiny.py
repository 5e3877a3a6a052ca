"""Tiny SD1- and SD2-shaped models (random weights) built from config, for CPU tests.

They keep the structure that matters to the code under test: cross-attention down/up blocks followed by a plain block,
two resnets per level, conv (SD1) vs linear (SD2) attention projections, the real CLIP tokenizer and vocabulary.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.bundle import ModelBundle
from trainer.models import build_bundle

# Photos from the DreamBooth dataset, downscaled to 256 px: dog/00-04, cat/00-02 (licence beside them).
PHOTOS = Path(__file__).resolve().parent / "data" / "dreambooth"


def tiny_unet_config(family: str) -> dict:
    sd2 = family == "sd2"
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 48 if sd2 else 32,
        "attention_head_dim": [2, 4] if sd2 else 4,
        "use_linear_projection": sd2,
        "norm_num_groups": 32,
    }


def tiny_vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "norm_num_groups": 32,
        "sample_size": 32,
        "scaling_factor": 0.18215,
    }


def tiny_text_config(family: str) -> dict:
    sd2 = family == "sd2"
    return {
        "vocab_size": 49408,
        "hidden_size": 48 if sd2 else 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu" if sd2 else "quick_gelu",
        "projection_dim": 48 if sd2 else 32,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0 if sd2 else 1,
    }


def tiny_bundle(family: str = "sd1", prediction_type: str = "epsilon", seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    bundle = build_bundle(family, prediction_type, tiny_unet_config(family), tiny_vae_config(),
                          tiny_text_config(family), source_name=f"tiny-{family}.safetensors")
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        module.eval()
    return bundle



@pytest.fixture(autouse=True, scope="module")
def one_thread(one_thread):
    """conftest.py's one_thread, autouse in modules that import it from here (as they did before conftest.py had it)."""
    yield
