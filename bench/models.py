"""The models the benchmarks (and the tests) train: full-size SD1.5/SD2.1 shapes from the shipped configs, or tiny
ones of the same structure for a CPU, with random weights (the values change neither memory nor speed).

The tiny configs keep the structure that matters to the code under test: cross-attention down/up blocks followed by a
plain block, two resnets per level, conv (SD1) vs linear (SD2) attention projections, the real CLIP tokenizer and
vocabulary.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from trainer.bundle import ModelBundle
from trainer.models import ModelConfigs, build_bundle, make_noise_scheduler, shipped_configs

PREDICTION_TYPES = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}  # SD2.1 is the 768-v model


def tiny_unet_config(family: str) -> dict:
    if family == "sdxl":
        return tiny_sdxl_unet_config()
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


def tiny_sdxl_unet_config() -> dict:
    """SDXL's structure, small: a plain first level, then cross-attention levels with 1 and 2 transformer layers,
    linear projections, and the text-time embedding (pooled text 48 wide + 6 time ids x 8 = 96 inputs)."""
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 1, 2],
        "cross_attention_dim": 80,  # 32 (CLIP-L's part) + 48 (bigG's part), concatenated
        "attention_head_dim": [2, 4, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 48 + 6 * 8,
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
    """The (first) text encoder: CLIP-L's kind for SD1 and SDXL, OpenCLIP's (gelu, wider) for SD2."""
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


def tiny_text_config_2() -> dict:
    """SDXL's second text encoder (OpenCLIP bigG's kind: gelu, "!" padding, a projection for the pooled output)."""
    return {**tiny_text_config("sd2"), "projection_dim": 48}


def model_configs(family: str, small: bool) -> ModelConfigs:
    """Full-size SD1.5 / SD2.1 / SDXL configs, or with `small` the tiny ones the tests use (for a CPU)."""
    if not small:
        return shipped_configs(family)
    return ModelConfigs(tiny_unet_config(family), tiny_vae_config(), tiny_text_config(family),
                        tiny_text_config_2() if family == "sdxl" else None)


def noise_images(count: int, size: int, seed: int) -> list[Image.Image]:
    """`count` RGB images of uniform noise, size x size: photos for the random models (their content changes
    neither memory nor speed)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def slim_configs(family: str) -> ModelConfigs:
    """SD 1.x / 2.x with every tensor of the full model (686 in SD 1.5's UNet, 196 in its text encoder) at a fortieth
    of its width: what a step launches and syncs is the full model's, its arithmetic next to nothing
    (bench/step_profile.py). The widths keep their ratios (320, 640, 1280 -> 8, 16, 32), so the same blocks change
    width and have shortcut convolutions."""
    if family not in ("sd1", "sd2"):
        raise ValueError(f"slim configs: SD 1.x / 2.x only, not {family!r}")
    full = shipped_configs(family)
    narrow = dict(norm_num_groups=8)
    unet = dict(full.unet, block_out_channels=[width // 40 for width in full.unet["block_out_channels"]],
                cross_attention_dim=32, attention_head_dim=8, **narrow)
    text = dict(full.text, hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)
    vae = dict(full.vae, block_out_channels=[width // 16 for width in full.vae["block_out_channels"]], **narrow)
    return ModelConfigs(unet, vae, text, None)


def random_bundle(family: str, small: bool, seed: int = 0, dtype: torch.dtype = torch.float32,
                  configs: ModelConfigs | None = None) -> ModelBundle:
    """A model of the family's shapes (or of `configs`) with random weights, made in seconds at full size (the values
    change neither memory nor speed): built on the meta device, then each weight drawn from N(0, 1/fan-in), as an
    initialiser would, so activations and the loss stay finite; norms 1, biases 0. `dtype`: the weights' type from
    the start (a full-size SDXL takes 14 GB in fp32, 7 in fp16)."""
    size = "custom" if configs else "small" if small else "full"
    configs = configs or model_configs(family, small)
    with torch.device("meta"):
        bundle = build_bundle(family, PREDICTION_TYPES[family], configs.unet, configs.vae, configs.text,
                              source_name=f"random-{family}",
                              source_hash=f"random-{family}-{size}-seed{seed}",
                              text_config_2=configs.text_2)
    bundle.noise_scheduler = make_noise_scheduler(PREDICTION_TYPES[family])  # its tables, not on meta
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in bundle.modules:
            module.to(dtype=dtype).to_empty(device="cpu")
            for name, tensor in module.named_parameters():
                if tensor.dim() == 1:
                    tensor.fill_(1.0 if name.endswith("weight") else 0.0)  # norms' scales, and every bias
                else:
                    tensor.normal_(0.0, tensor[0].numel() ** -0.5, generator=generator)
            for name, buffer in module.named_buffers():  # CLIP's position ids are its only buffer
                buffer.copy_(torch.arange(buffer.shape[-1]).expand(buffer.shape))
            module.eval()
    return bundle
