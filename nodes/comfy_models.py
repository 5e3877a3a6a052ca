"""A checkpoint as ComfyUI's MODEL, CLIP and VAE.

Checkpoints ComfyUI recognises go through its own loader, so Load Subject Model gives exactly what Load Checkpoint
gives. ComfyUI recognises SD1.x only at full size (model_channels 320, context_dim 768), so the pack's small models
(the toy base and what is trained from it) are built here from ComfyUI's public classes: the SD 1.x model class with
the UNet shape ComfyUI reads from the weights, and CLIP-L with the text encoder's shape from our metadata. Only the
VAE is the engine's own (diffusers) module behind ComfyUI's VAE interface: ComfyUI's VAE classes fix GroupNorm at 32
groups, and the toy VAE uses 16.
"""
from __future__ import annotations

import json

import torch

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import folder_paths

from ..trainer import metadata as meta

# The text encoder's shape, in the config keys ComfyUI's CLIP-L and transformers share.
_CLIP_SHAPE = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
               "max_position_embeddings", "projection_dim", "vocab_size", "layer_norm_eps")


def load_checkpoint(path: str) -> tuple:
    """(model, clip, vae) of the single-file checkpoint at `path`."""
    state, header = comfy.utils.load_torch_file(path, return_metadata=True)
    header = header or {}
    embeddings = folder_paths.get_folder_paths("embeddings")
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state)
    unet_config = comfy.model_detection.detect_unet_config(state, prefix, metadata=header)
    if unet_config is not None and any(known.matches(unet_config, state) for known in comfy.supported_models.models):
        model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(state, embedding_directory=embeddings,
                                                                    metadata=header)
        return model, clip, vae
    if unet_config is None or meta.CONFIGS["unet"] not in header or \
            header.get(meta.ARCHITECTURE) != "stable-diffusion-v1":
        raise ValueError(f"ComfyUI does not recognise the model in {path} (it knows SD 1.x, 2.x and SDXL at their "
                         "full sizes), and it is not a small SD 1.x model trained by this pack. Choose an SD 1.x, 2.x "
                         "or SDXL checkpoint.")
    configs = {part: json.loads(header[key]) for part, key in meta.CONFIGS.items() if key in header}  # (no text_2)
    model_config = _sd1_config(unet_config, configs)
    return (_model(state, prefix, model_config), _clip(state, model_config, configs["text"], embeddings),
            _vae(path))


def _sd1_config(unet_config: dict, configs: dict) -> comfy.supported_models.SD15:
    model_config = comfy.supported_models.SD15(unet_config)
    # Not in the weights: the number of attention heads (diffusers' SD 1.x attention_head_dim counts heads) and the
    # latent scale; SD15 assumes 8 heads and 0.18215.
    heads = configs["unet"].get("num_attention_heads") or configs["unet"]["attention_head_dim"]
    if isinstance(heads, list):
        if len(set(heads)) != 1:
            raise ValueError(f"A UNet with {heads} attention heads per level cannot be loaded in ComfyUI.")
        heads = heads[0]
    model_config.unet_config.update(num_heads=heads, num_head_channels=-1)
    model_config.latent_format.scale_factor = configs["vae"]["scaling_factor"]
    return model_config


def _model(state: dict, prefix: str, model_config) -> comfy.model_patcher.ModelPatcher:
    """What comfy.sd.load_state_dict_guess_config does once it knows the model's class."""
    load_device = mm.get_torch_device()
    dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(state, prefix),
                          supported_dtypes=model_config.supported_inference_dtypes,
                          weight_dtype=comfy.utils.weight_dtype(state, prefix))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                model_config.supported_inference_dtypes))
    model = model_config.get_model(state, prefix)
    model.load_model_weights(state, prefix)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def _clip(state: dict, model_config, text_config: dict, embeddings) -> comfy.sd.CLIP:
    clip_state = model_config.process_clip_state_dict(state)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    shape = {key: text_config[key] for key in _CLIP_SHAPE if key in text_config}
    clip = comfy.sd.CLIP(target, embedding_directory=embeddings, tokenizer_data=clip_state,
                         parameters=comfy.utils.calculate_parameters(clip_state),
                         model_options={"clip_l_model_config": shape})
    missing, _ = clip.load_sd(clip_state, full_model=True)
    missing = [key for key in missing if not key.endswith(("logit_scale", "text_projection.weight"))]
    if missing:  # ComfyUI would only warn, and the prompts would encode to nothing
        raise ValueError(f"The checkpoint's text encoder lacks {len(missing)} weights, e.g. {missing[0]}.")
    return clip


class _Autoencoder(torch.nn.Module):
    """ComfyUI's first-stage interface over a diffusers AutoencoderKL: pixels in -1..1 <-> unscaled latents."""

    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(pixels).latent_dist.mode()  # ComfyUI's SD VAE encodes to the mean too

    def decode(self, latents: torch.Tensor, **_) -> torch.Tensor:
        return self.autoencoder.decode(latents).sample


class SmallVAE(comfy.sd.VAE):
    """ComfyUI's VAE around the engine's diffusers VAE. ComfyUI's VAE.__init__ picks its module by the weights'
    names and shapes, so this sets what it sets for an SD VAE instead, with this VAE's scale."""

    def __init__(self, autoencoder):
        self.first_stage_model = _Autoencoder(autoencoder).eval()
        self.memory_used_encode = lambda shape, dtype: 1767 * shape[2] * shape[3] * mm.dtype_size(dtype)
        self.memory_used_decode = lambda shape, dtype: 2178 * shape[2] * shape[3] * 64 * mm.dtype_size(dtype)
        self.downscale_ratio = self.upscale_ratio = 2 ** (len(autoencoder.config.block_out_channels) - 1)
        self.latent_channels = autoencoder.config.latent_channels
        self.latent_dim = 2
        self.output_channels = 3
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.disable_offload = False
        self.not_video = False
        self.downscale_index_formula = self.upscale_index_formula = None
        self.extra_1d_channel = None
        self.crop_input = True
        self.device = mm.vae_device()
        self.vae_dtype = mm.vae_dtype(self.device, self.working_dtypes)
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = mm.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                        offload_device=mm.vae_offload_device())


def _vae(path: str) -> SmallVAE:
    from ..trainer.models import load_model

    return SmallVAE(load_model(path).vae)  # the whole (small) model: the engine's one way to read our files
