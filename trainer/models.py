"""Model bundle: the diffusers modules a DreamBooth run needs, and how to build or load them offline."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import metadata as meta
from .bundle import ModelBundle
from .checkpoint import (TEXT_PREFIX, UNET_PREFIX, V_PRED_KEY, VAE_PREFIX, ModelLoadError, modules_to_ldm,
                         open_checkpoint, read_tensor, unet_to_ldm)

# One folder per family in diffusers' layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/):
# the engine's configs and tokenizer, and what `from_single_file(path, config=<folder>)` needs to load our output.
CONFIG_DIR = Path(__file__).parent / "configs"
PREDICTION_TYPES = ("epsilon", "v_prediction")


def load_tokenizer(family: str) -> CLIPTokenizer:
    """The family's CLIP BPE tokenizer from its shipped folder. Both families have the same vocabulary; SD1's CLIP-L
    pads with <|endoftext|>, SD2's OpenCLIP-H with "!" (id 0), as its original code did."""
    return CLIPTokenizer.from_pretrained(str(CONFIG_DIR / family / "tokenizer"))


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


# --- loading a base model ----------------------------------------------------------------------------------------

class ModelConfigs(NamedTuple):
    unet: dict
    vae: dict
    text: dict


def shipped_configs(family: str) -> ModelConfigs:
    """The full-size SD1.5 / SD2.1 configs shipped with the pack (nothing is fetched from a hub)."""
    return ModelConfigs(*(json.loads((CONFIG_DIR / family / part / "config.json").read_text())
                          for part in ("unet", "vae", "text_encoder")))


def load_model(path: str | os.PathLike, prediction_type: str | None = None, *,
               dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load an SD1.x/SD2.x base model: a single-file LDM-layout .safetensors checkpoint or a diffusers folder.

    prediction_type overrides what the model says about itself ("epsilon" or "v_prediction"); modules come back
    in eval mode as `dtype`. Raises ModelLoadError, naming the file and the fix, for anything it cannot use.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} or None (read it from the model), "
                         f"got {prediction_type!r}")
    path = Path(path)
    if path.is_dir():
        return _load_diffusers_folder(path, prediction_type, dtype)
    return _load_single_file(path, prediction_type, dtype)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so loading the same checkpoint again is instant."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime_ns only key the cache
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def folder_sha256(folder: Path) -> str:
    """An id for a diffusers folder: sha256 over the names and contents of model_index.json and the
    unet/, vae/ and text_encoder/ files, so two different folders never share a prior-image cache."""
    files = [folder / "model_index.json"]
    for part in ("unet", "vae", "text_encoder"):
        files += sorted(file for file in (folder / part).rglob("*") if file.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0" + bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


def _kept(key: str) -> bool:
    """Not kept from a base file: its EMA copy of the UNet (stale once we fine-tune) and the v-prediction marker
    (export writes the one the bundle's prediction type needs)."""
    return not key.startswith("model_ema.") and key != V_PRED_KEY


def _load_single_file(path: Path, prediction_type: str | None, dtype: torch.dtype) -> ModelBundle:
    with open_checkpoint(path) as file:
        metadata = file.metadata() or {}
        names = _ldm_names(file.keys())
        shapes = {key: tuple(file.get_slice(name).get_shape()) for key, name in names.items()}
        family = _identify(path, shapes)
        configs = _configs_from_metadata(path, metadata) or shipped_configs(family)
        unet, vae, text_encoder = _meta_modules(configs)
        expected = modules_to_ldm(unet, vae, text_encoder, family)
        _check_layout(path, family, expected, shapes)
        weights = {key: read_tensor(file, path, name) for key, name in names.items() if _kept(key)}

    _adopt(unet, convert_ldm_unet_checkpoint(weights, dict(unet.config)), dtype)
    _adopt(vae, convert_ldm_vae_checkpoint(weights, dict(vae.config)), dtype)
    _fill_text_encoder(text_encoder, family, weights, dtype)
    prediction = prediction_type or _file_prediction_type(path, metadata, family, weights, V_PRED_KEY in names)
    passthrough = {key: tensor for key, tensor in weights.items() if key not in expected}
    return _assemble(unet, vae, text_encoder, family, prediction, path.name, file_sha256(path), passthrough)


def _ldm_names(file_keys) -> dict[str, str]:
    """Our name for each tensor -> its name in the file. Some SD1 files lack `text_model.` in the text keys."""
    old = "cond_stage_model.transformer."
    return {(TEXT_PREFIX["sd1"] + key[len(old):] if key.startswith(old) and not key.startswith(TEXT_PREFIX["sd1"])
             else key): key for key in file_keys}


_PARTS = (("a UNet", (UNET_PREFIX, "input_blocks.", "down_blocks.")),
          ("a VAE", (VAE_PREFIX, "encoder.down", "decoder.up", "encoder.conv_in")),
          ("a text encoder", ("cond_stage_model.", "text_model.")))


def _identify(path: Path, shapes: dict[str, tuple]) -> str:
    """The family ("sd1"/"sd2") of a full SD checkpoint; anything else is refused with what it is instead."""
    keys = list(shapes)

    def starts(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    def contains(part: str) -> bool:
        return any(part in key for key in keys)

    if starts("lora_unet_", "lora_te") or contains(".lora_down.") or contains(".lora_A."):
        raise ModelLoadError(f"{path} is a LoRA, not a full checkpoint. DreamBooth fine-tunes a whole model: choose "
                             "the SD1.x/SD2.x base checkpoint instead (apply LoRAs later with ComfyUI's LoraLoader).")
    for marker, name in (("conditioner.embedders.", "Stable Diffusion XL"), ("joint_blocks.", "Stable Diffusion 3"),
                         ("double_blocks.", "Flux")):
        if contains(marker):
            raise ModelLoadError(f"{path} is a {name} checkpoint. This pack trains Stable Diffusion 1.x and 2.x "
                                 "checkpoints only: choose an SD1.5 or SD2.1 based .safetensors file.")
    family = "sd2" if starts(TEXT_PREFIX["sd2"]) else "sd1" if starts(TEXT_PREFIX["sd1"]) else None
    if family is None or not starts(UNET_PREFIX) or not starts(VAE_PREFIX):
        found = [part for part, prefixes in _PARTS if starts(*prefixes)]
        what = " and ".join(found) if found else f"no Stable Diffusion weights (first keys: {keys[:3]})"
        raise ModelLoadError(f"{path} holds {what}, not a full checkpoint (e.g. a VAE-only or UNet-only file). "
                             "DreamBooth needs one file with the UNet, VAE and text encoder: choose a full SD1.x/SD2.x "
                             "checkpoint.")
    in_channels = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        raise ModelLoadError(f"{path} is an inpainting or other image-conditioned model: its UNet takes {in_channels} "
                             "input channels instead of 4. Choose a regular text-to-image SD1.x/SD2.x checkpoint.")
    return family


def _configs_from_metadata(path: Path, metadata: dict[str, str]) -> ModelConfigs | None:
    """The module configs our exporter stored in the file, if it did (that is how unusual shapes round-trip)."""
    if not all(key in metadata for key in meta.CONFIGS.values()):
        return None
    try:
        return ModelConfigs(*(json.loads(metadata[meta.CONFIGS[part]]) for part in ("unet", "vae", "text")))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} has unreadable dreambooth.*_config metadata ({exc}); export it again.") from exc


def _meta_modules(configs: ModelConfigs) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Modules on the meta device: their names and shapes, without allocating or randomly initialising weights."""
    with torch.device("meta"):
        return (UNet2DConditionModel.from_config(configs.unet), AutoencoderKL.from_config(configs.vae),
                CLIPTextModel(CLIPTextConfig.from_dict(configs.text)))


def _check_layout(path: Path, family: str, expected: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> None:
    """Every weight the modules need is in the file with the right shape, and the file has no UNet or VAE weights
    the modules lack (a different architecture); other extra tensors are kept as passthrough."""
    missing = [key for key in expected if key not in shapes]
    reshaped = [f"{key}: file {list(shapes[key])}, expected {list(expected[key].shape)}"
                for key in expected if key in shapes and shapes[key] != tuple(expected[key].shape)]
    unknown = [key for key in shapes if key.startswith((UNET_PREFIX, VAE_PREFIX)) and key not in expected]
    problems = [f"{len(found)} {what}, e.g. {found[0]}" for found, what in
                ((missing, "weights missing"), (reshaped, "weights with another shape"), (unknown, "unknown weights"))
                if found]
    if problems:
        raise ModelLoadError(f"{path} does not match the standard {family.upper()} layout: {'; '.join(problems)}. "
                             "It may be a modified or different architecture; choose a standard SD1.x/SD2.x "
                             "checkpoint.")


def _adopt(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Make the converted tensors the module's weights (no copy where the file already has `dtype`)."""
    state = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    module.load_state_dict(state, assign=True)


def _fill_text_encoder(model: CLIPTextModel, family: str, weights: dict[str, torch.Tensor],
                       dtype: torch.dtype) -> None:
    """Give a meta-device CLIP text model its weights, converted from LDM names with diffusers' converters."""
    if family == "sd2":
        converted = convert_open_clip_checkpoint(model, weights)
    else:
        converted = convert_ldm_clip_checkpoint(weights)
    own = model.state_dict().keys()
    state = {}
    for key, tensor in converted.items():  # converters say text_model.*, which transformers 5 modules lack
        name = key if key in own else key.removeprefix("text_model.")
        if name in own:  # the rest (position_ids, extra layers) stays in the passthrough
            state[name] = tensor
    _adopt(model, state, dtype)
    _restore_position_ids(model)


def _restore_position_ids(model: CLIPTextModel) -> None:
    """A meta-device build leaves computed buffers empty. CLIP's only one is position_ids (0, 1, ..., 76), which
    no checkpoint stores; any other empty buffer means transformers changed and we must not guess."""
    for name, buffer in model.named_buffers():
        if not buffer.is_meta:
            continue
        owner, _, attribute = name.rpartition(".")
        if attribute != "position_ids":
            raise RuntimeError(f"cannot rebuild the {name} buffer of a meta-device {type(model).__name__}")
        positions = torch.arange(buffer.shape[-1]).expand(buffer.shape)
        model.get_submodule(owner).register_buffer(attribute, positions, persistent=False)


COMFY_SD2_V_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


def comfy_sd2_prediction_type(ldm_weights: dict[str, torch.Tensor]) -> str:
    """ComfyUI's guess for an SD2 file (comfy/supported_models.py, SD20.model_type): v-prediction when this norm
    bias is spread out. ComfyUI ignores metadata and the v_pred key for SD2, so following its rule means we train
    the prediction type ComfyUI will sample with."""
    bias = ldm_weights.get(COMFY_SD2_V_PROBE)
    if bias is not None and torch.std(bias.float(), correction=0) > 0.09:
        return "v_prediction"
    return "epsilon"


def _file_prediction_type(path: Path, metadata: dict[str, str], family: str, weights: dict[str, torch.Tensor],
                          has_v_pred_key: bool) -> str:
    # ModelSpec's key, then ComfyUI's CheckpointSave spelling of it.
    stated = metadata.get(meta.PREDICTION_TYPE) or metadata.get(meta.PREDICT_KEY)
    if stated:
        if stated in ("v", "v_prediction"):
            return "v_prediction"
        if stated == "epsilon":
            return "epsilon"
        raise ModelLoadError(f"{path} says its prediction type is {stated!r}, which SD1/SD2 training does not support. "
                             "If you know better, pass prediction_type='epsilon' or 'v_prediction'.")
    if has_v_pred_key:
        return "v_prediction"
    return comfy_sd2_prediction_type(weights) if family == "sd2" else "epsilon"


def _load_diffusers_folder(folder: Path, prediction_type: str | None, dtype: torch.dtype) -> ModelBundle:
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} is a folder but not a diffusers model (no model_index.json). Choose a "
                             "single-file .safetensors checkpoint or a diffusers folder.")
    options = {"local_files_only": True, "use_safetensors": True}  # never a hub, never a pickle
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **options)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **options)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **options).to(dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: could not load the diffusers model ({exc}). It needs unet/, vae/ and "
                             "text_encoder/ subfolders with .safetensors weights (pickled .bin weights are not "
                             "loaded).") from exc
    # OpenCLIP-H (SD2) uses gelu where OpenAI's CLIP-L (SD1) uses quick_gelu.
    family = "sd2" if text_encoder.config.hidden_act == "gelu" else "sd1"
    prediction = prediction_type or _folder_prediction_type(folder, unet, family)
    return _assemble(unet, vae, text_encoder, family, prediction, folder.name, folder_sha256(folder), {})


def _folder_prediction_type(folder: Path, unet: UNet2DConditionModel, family: str) -> str:
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        stated = json.loads(scheduler_config.read_text()).get("prediction_type")
        if stated in PREDICTION_TYPES:
            return stated
    return comfy_sd2_prediction_type(unet_to_ldm(unet)) if family == "sd2" else "epsilon"


def _assemble(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, family: str,
              prediction_type: str, source_name: str, source_hash: str,
              passthrough: dict[str, torch.Tensor]) -> ModelBundle:
    for module in (unet, vae, text_encoder):
        module.eval()
    return ModelBundle(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(family),
                       noise_scheduler=make_noise_scheduler(prediction_type), family=family,
                       source_name=source_name, source_hash=source_hash, passthrough=passthrough)
