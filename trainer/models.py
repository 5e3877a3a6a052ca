"""Model bundle: the diffusers modules a DreamBooth run needs, and how to build or load them offline."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                 convert_open_clip_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import metadata as meta
from .bundle import ModelBundle
from .checkpoint import (UNET_PREFIX, V_PRED_KEY, VAE_PREFIX, ZTSNR_KEY, ModelLoadError, modules_to_ldm,
                         open_checkpoint, read_tensor, unet_to_ldm)
from .families import CONFIG_DIR, SD1, SD2, SDXL, Family, TextEncoderSlot
from .families import family as family_named

PREDICTION_TYPES = ("epsilon", "v_prediction")


def load_tokenizer(family: str, which: str = "tokenizer") -> CLIPTokenizer:
    """A CLIP BPE tokenizer from the family's shipped folder (`which`: tokenizer, or SDXL's tokenizer_2). All have
    the same vocabulary; OpenAI's CLIP-L (SD1, SDXL's first) pads with <|endoftext|>, OpenCLIP-H/bigG (SD2, SDXL's
    second) with "!" (id 0), as their original code did."""
    return CLIPTokenizer.from_pretrained(str(CONFIG_DIR / family / which))


def make_noise_scheduler(prediction_type: str, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The training-time noise schedule every SD1/SD2/SDXL checkpoint was trained with; zero_terminal_snr rescales it
    so the last step is pure noise (Lin et al. 2024), as some SDXL v-prediction descendants were trained."""
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
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def _text_model(slot: TextEncoderSlot, config: dict) -> CLIPTextModel:
    return (CLIPTextModelWithProjection if slot.projection else CLIPTextModel)(CLIPTextConfig.from_dict(config))


def build_bundle(family: str, prediction_type: str, unet_config: dict, vae_config: dict, text_config: dict,
                 source_name: str = "", source_hash: str = "", *, text_config_2: dict | None = None,
                 zero_terminal_snr: bool = False) -> ModelBundle:
    """Modules with freshly initialised weights, shaped by the given diffusers/transformers configs
    (text_config_2: SDXL's second text encoder)."""
    spec = family_named(family)
    text_configs = [text_config] + ([text_config_2] if spec.is_xl else [])
    if spec.is_xl and text_config_2 is None:
        raise ValueError("an SDXL bundle needs text_config_2 (its OpenCLIP ViT-bigG text encoder)")
    encoders = [_text_model(slot, config) for slot, config in zip(spec.text_encoders, text_configs)]
    return _bundle(UNet2DConditionModel.from_config(unet_config), AutoencoderKL.from_config(vae_config), encoders,
                   spec, prediction_type, zero_terminal_snr, source_name, source_hash, {})


def _bundle(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoders: list, spec: Family, prediction_type: str,
            zero_terminal_snr: bool, source_name: str, source_hash: str,
            passthrough: dict[str, torch.Tensor]) -> ModelBundle:
    """The modules as a ModelBundle, with the family's tokenizers and the training noise schedule."""
    tokenizers = [load_tokenizer(spec.name, slot.tokenizer) for slot in spec.text_encoders]
    return ModelBundle(unet=unet, vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0],
                       noise_scheduler=make_noise_scheduler(prediction_type, zero_terminal_snr), family=spec.name,
                       source_name=source_name, source_hash=source_hash, passthrough=passthrough,
                       text_encoder_2=text_encoders[1] if spec.is_xl else None,
                       tokenizer_2=tokenizers[1] if spec.is_xl else None)


# --- loading a base model ----------------------------------------------------------------------------------------

class ModelConfigs(NamedTuple):
    unet: dict
    vae: dict
    text: dict
    text_2: dict | None = None  # SDXL's second text encoder


def shipped_configs(family: str) -> ModelConfigs:
    """The full-size SD1.5 / SD2.1 / SDXL base configs shipped with the pack (nothing is fetched from a hub)."""
    spec = family_named(family)
    parts = ["unet", "vae"] + [slot.folder for slot in spec.text_encoders]
    return ModelConfigs(*(json.loads((spec.config_dir / part / "config.json").read_text()) for part in parts))


def load_model(path: str | os.PathLike, prediction_type: str | None = None, *, dtype: torch.dtype = torch.float32,
               zero_terminal_snr: bool | None = None) -> ModelBundle:
    """Load an SD1.x/SD2.x/SDXL base model: a single-file LDM-layout .safetensors checkpoint or a diffusers folder.

    prediction_type ("epsilon" or "v_prediction") and zero_terminal_snr override what the model says about itself;
    modules come back in eval mode as `dtype`. Raises ModelLoadError, naming the file and the fix, for anything it
    cannot use.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} or None (read it from the model), "
                         f"got {prediction_type!r}")
    path = Path(path)
    if path.is_dir():
        return _load_diffusers_folder(path, prediction_type, zero_terminal_snr, dtype)
    return _load_single_file(path, prediction_type, zero_terminal_snr, dtype)


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
    unet/, vae/ and text_encoder(_2)/ files, so two different folders never share a prior-image cache."""
    files = [folder / "model_index.json"]
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        files += sorted(file for file in (folder / part).rglob("*") if file.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0" + bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


def _kept(key: str) -> bool:
    """Not kept from a base file: its EMA copy of the UNet (stale once we fine-tune) and the prediction markers
    (export writes the ones the bundle's noise schedule needs)."""
    return not key.startswith("model_ema.") and key not in (V_PRED_KEY, ZTSNR_KEY)


def _load_single_file(path: Path, prediction_type: str | None, zero_terminal_snr: bool | None,
                      dtype: torch.dtype) -> ModelBundle:
    with open_checkpoint(path) as file:
        metadata = file.metadata() or {}
        names = _ldm_names(file.keys())
        shapes = {key: tuple(file.get_slice(name).get_shape()) for key, name in names.items()}
        spec = _identify(path, shapes)
        _refuse_distilled(path, spec, metadata)
        configs = _configs_from_metadata(path, metadata, spec) or shipped_configs(spec.name)
        unet, vae, text_encoders = _meta_modules(spec, configs)
        expected = modules_to_ldm(unet, vae, text_encoders, spec)
        _check_layout(path, spec, expected, shapes)
        weights = {key: read_tensor(file, path, name) for key, name in names.items() if _kept(key)}

    prediction = prediction_type or _file_prediction_type(path, metadata, spec, weights, V_PRED_KEY in names)
    zsnr = ZTSNR_KEY in names if zero_terminal_snr is None else zero_terminal_snr
    passthrough = {key: tensor for key, tensor in weights.items() if key not in expected}
    # One part at a time, its file tensors dropped once adopted: the peak is the modules and one part's file tensors
    # (a full SDXL fp16 file into fp32 modules: 14 GB of modules instead of 21 GB in all).
    _adopt(unet, convert_ldm_unet_checkpoint(_take(weights, UNET_PREFIX), dict(unet.config)), dtype)
    _adopt(vae, convert_ldm_vae_checkpoint(_take(weights, VAE_PREFIX), dict(vae.config)), dtype)
    for encoder, slot in zip(text_encoders, spec.text_encoders):
        _fill_text_encoder(encoder, slot, _take(weights, slot.prefix), dtype)
    del weights
    return _assemble(unet, vae, text_encoders, spec, prediction, zsnr, path.name, file_sha256(path), passthrough)


def _take(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, removed from `weights`."""
    return {key: weights.pop(key) for key in [key for key in weights if key.startswith(prefix)]}


def _ldm_names(file_keys) -> dict[str, str]:
    """Our name for each tensor -> its name in the file. Some SD1 files lack `text_model.` in the text keys."""
    old, ours = "cond_stage_model.transformer.", SD1.text_encoders[0].prefix
    return {(ours + key[len(old):] if key.startswith(old) and not key.startswith(ours) else key): key
            for key in file_keys}


_PARTS = (("a UNet", (UNET_PREFIX, "input_blocks.", "down_blocks.")),
          ("a VAE", (VAE_PREFIX, "encoder.down", "decoder.up", "encoder.conv_in")),
          ("a text encoder", ("cond_stage_model.", "conditioner.", "text_model.")))
SUPPORTED = "an SD1.x, SD2.x or SDXL"


def _identify(path: Path, shapes: dict[str, tuple]) -> Family:
    """The family of a full SD checkpoint; anything else is refused with what it is instead."""
    keys = list(shapes)

    def starts(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    def contains(part: str) -> bool:
        return any(part in key for key in keys)

    if starts("lora_unet_", "lora_te") or contains(".lora_down.") or contains(".lora_A."):
        raise ModelLoadError(f"{path} is a LoRA, not a full checkpoint. DreamBooth fine-tunes a whole model: choose "
                             f"{SUPPORTED} base checkpoint instead (apply LoRAs later with ComfyUI's LoraLoader).")
    for marker, name in (("joint_blocks.", "Stable Diffusion 3"), ("double_blocks.", "Flux")):
        if contains(marker):
            raise ModelLoadError(f"{path} is a {name} checkpoint. This pack trains Stable Diffusion 1.x, 2.x and XL "
                                 f"checkpoints: choose {SUPPORTED} based .safetensors file.")
    if starts("conditioner.embedders.0.model.") and not starts("conditioner.embedders.1."):
        raise ModelLoadError(f"{path} is the SDXL refiner. It only refines the base model's latents in the last "
                             "denoising steps and draws nothing from a prompt alone, so there is no subject to teach "
                             "it: train the SDXL base (or a model built on it) and use the refiner unchanged.")
    spec = next((spec for spec in (SDXL, SD2, SD1) if all(starts(slot.prefix) for slot in spec.text_encoders)), None)
    if spec is None or not starts(UNET_PREFIX) or not starts(VAE_PREFIX):
        found = [part for part, prefixes in _PARTS if starts(*prefixes)]
        what = " and ".join(found) if found else f"no Stable Diffusion weights (first keys: {keys[:3]})"
        raise ModelLoadError(f"{path} holds {what}, not a full checkpoint (e.g. a VAE-only or UNet-only file). "
                             f"DreamBooth needs one file with the UNet, VAE and text encoders: choose {SUPPORTED} "
                             "full checkpoint.")
    in_channels = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        raise ModelLoadError(f"{path} is an inpainting or other image-conditioned model: its UNet takes {in_channels} "
                             f"input channels instead of 4. Choose a regular text-to-image {spec.title} checkpoint.")
    return spec


# How distilled few-step SDXL models name themselves: SDXL-Turbo, SDXL-Lightning, LCM, Hyper-SD.
_DISTILLED = re.compile(r"turbo|lightning|lcm|hyper[-_ ]?sd")


def _refuse_distilled(path: Path, spec: Family, metadata: dict[str, str]) -> None:
    """Distilled models draw in 1-8 steps. DreamBooth's denoising loss over all 1000 noise levels undoes the
    distillation, so the result samples neither fast nor well. Known from ModelSpec's architecture or title, or the
    file name."""
    if not spec.is_xl:
        return
    said = " ".join((metadata.get(meta.ARCHITECTURE, ""), metadata.get(meta.TITLE, ""), path.stem)).lower()
    found = _DISTILLED.search(said)
    if found:
        raise ModelLoadError(f"{path} looks like a distilled few-step SDXL model ({found.group()!r} in its name or "
                             "metadata). DreamBooth trains the ordinary denoising objective, which undoes a "
                             "distillation: the result would need many steps again and draw worse. Train the SDXL base "
                             "model (or a non-distilled model built on it) instead; if this file is not distilled, "
                             "rename it.")


def _configs_from_metadata(path: Path, metadata: dict[str, str], spec: Family) -> ModelConfigs | None:
    """The module configs our exporter stored in the file, if it did (that is how unusual shapes round-trip)."""
    parts = ["unet", "vae", "text"] + (["text_2"] if spec.is_xl else [])
    if not all(meta.CONFIGS[part] in metadata for part in parts):
        return None
    try:
        return ModelConfigs(*(json.loads(metadata[meta.CONFIGS[part]]) for part in parts))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} has unreadable dreambooth.*_config metadata ({exc}); export it again.") from exc


def _meta_modules(spec: Family, configs: ModelConfigs) -> tuple[UNet2DConditionModel, AutoencoderKL, list]:
    """Modules on the meta device: their names and shapes, without allocating or randomly initialising weights."""
    text_configs = (configs.text, configs.text_2)
    with torch.device("meta"):
        return (UNet2DConditionModel.from_config(configs.unet), AutoencoderKL.from_config(configs.vae),
                [_text_model(slot, config) for slot, config in zip(spec.text_encoders, text_configs)])


def _check_layout(path: Path, spec: Family, expected: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> None:
    """Every weight the modules need is in the file with the right shape, and the file has no UNet or VAE weights
    the modules lack (a different architecture); other extra tensors are kept as passthrough."""
    # position_ids is computed (0, 1, ..., 76), not learned: transformers before 4.31 keeps it in the state dict,
    # and files may or may not have it.
    missing = [key for key in expected if key not in shapes and not key.endswith(".position_ids")]
    reshaped = [f"{key}: file {list(shapes[key])}, expected {list(expected[key].shape)}"
                for key in expected if key in shapes and shapes[key] != tuple(expected[key].shape)]
    unknown = [key for key in shapes if key.startswith((UNET_PREFIX, VAE_PREFIX)) and key not in expected]
    problems = [f"{len(found)} {what}, e.g. {found[0]}" for found, what in
                ((missing, "weights missing"), (reshaped, "weights with another shape"), (unknown, "unknown weights"))
                if found]
    if problems:
        raise ModelLoadError(f"{path} does not match the standard {spec.title} layout: {'; '.join(problems)}. "
                             f"It may be a modified or different architecture; choose a standard {spec.title} "
                             "checkpoint.")


def _adopt(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Make the converted tensors the module's weights (no copy where the file already has `dtype`)."""
    state = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    module.load_state_dict(state, assign=True)


def _fill_text_encoder(model: CLIPTextModel, slot: TextEncoderSlot, weights: dict[str, torch.Tensor],
                       dtype: torch.dtype) -> None:
    """Give a meta-device CLIP text model its weights from the file's LDM names (OpenCLIP's through diffusers'
    converter)."""
    if slot.open_clip:
        converted = convert_open_clip_checkpoint(model, weights, prefix=slot.prefix)
    else:
        converted = {key[len(slot.prefix):]: tensor for key, tensor in weights.items() if key.startswith(slot.prefix)}
    own = model.state_dict().keys()
    state = {}
    for key, tensor in converted.items():  # say text_model.* or not: transformers 5's CLIPTextModel lacks it
        for name in (key, key.removeprefix("text_model."), "text_model." + key):
            if name in own:  # the rest (position_ids, extra layers) stays in the passthrough
                state[name] = tensor
                break
    for name in own - state.keys():
        if name.endswith("position_ids"):  # a persistent buffer in transformers < 4.31 (the A1111 WebUI's 4.30)
            state[name] = _positions(model.get_buffer(name).shape)
    _adopt(model, state, dtype)
    restore_position_ids(model)


def _positions(shape: torch.Size) -> torch.Tensor:
    return torch.arange(shape[-1]).expand(shape).clone()


def restore_position_ids(model: CLIPTextModel) -> None:
    """A meta-device build leaves computed buffers empty. CLIP's only one is position_ids (0, 1, ..., 76), which
    no checkpoint stores; any other empty buffer means transformers changed and we must not guess."""
    for name, buffer in model.named_buffers():
        if not buffer.is_meta:
            continue
        owner, _, attribute = name.rpartition(".")
        if attribute != "position_ids":
            raise RuntimeError(f"cannot rebuild the {name} buffer of a meta-device {type(model).__name__}")
        model.get_submodule(owner).register_buffer(attribute, _positions(buffer.shape), persistent=False)


COMFY_SD2_V_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


def comfy_sd2_prediction_type(ldm_weights: dict[str, torch.Tensor]) -> str:
    """ComfyUI's guess for an SD2 file (comfy/supported_models.py, SD20.model_type): v-prediction when this norm
    bias is spread out. ComfyUI ignores metadata and the v_pred key for SD2, so following its rule means we train
    the prediction type ComfyUI will sample with."""
    bias = ldm_weights.get(COMFY_SD2_V_PROBE)
    if bias is not None and torch.std(bias.float(), correction=0) > 0.09:
        return "v_prediction"
    return "epsilon"


def _file_prediction_type(path: Path, metadata: dict[str, str], spec: Family, weights: dict[str, torch.Tensor],
                          has_v_pred_key: bool) -> str:
    # ModelSpec's key, then ComfyUI's CheckpointSave spelling of it.
    stated = metadata.get(meta.PREDICTION_TYPE) or metadata.get(meta.PREDICT_KEY)
    if stated:
        if stated in ("v", "v_prediction"):
            return "v_prediction"
        if stated == "epsilon":
            return "epsilon"
        raise ModelLoadError(f"{path} says its prediction type is {stated!r}, which DreamBooth training does not "
                             "support. If you know better, pass prediction_type='epsilon' or 'v_prediction'.")
    if has_v_pred_key:
        return "v_prediction"
    return comfy_sd2_prediction_type(weights) if spec is SD2 else "epsilon"


def _load_diffusers_folder(folder: Path, prediction_type: str | None, zero_terminal_snr: bool | None,
                           dtype: torch.dtype) -> ModelBundle:
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} is a folder but not a diffusers model (no model_index.json). Choose a "
                             "single-file .safetensors checkpoint or a diffusers folder.")
    options = {"local_files_only": True, "use_safetensors": True}  # never a hub, never a pickle
    xl = (folder / "text_encoder_2").is_dir()
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **options)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **options)
        text_encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder", **options).to(dtype)]
        if xl:
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2",
                                                                             **options).to(dtype))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: could not load the diffusers model ({exc}). It needs unet/, vae/ and "
                             "text_encoder/ (and for SDXL text_encoder_2/) subfolders with .safetensors weights "
                             "(pickled .bin weights are not loaded).") from exc
    # OpenCLIP-H (SD2) uses gelu where OpenAI's CLIP-L (SD1) uses quick_gelu.
    spec = SDXL if xl else SD2 if text_encoders[0].config.hidden_act == "gelu" else SD1
    stated = _folder_scheduler_config(folder)
    prediction = prediction_type or stated.get("prediction_type")
    if prediction not in PREDICTION_TYPES:
        prediction = comfy_sd2_prediction_type(unet_to_ldm(unet)) if spec is SD2 else "epsilon"
    zsnr = bool(stated.get("rescale_betas_zero_snr", False)) if zero_terminal_snr is None else zero_terminal_snr
    return _assemble(unet, vae, text_encoders, spec, prediction, zsnr, folder.name, folder_sha256(folder), {})


def _folder_scheduler_config(folder: Path) -> dict:
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    return json.loads(scheduler_config.read_text()) if scheduler_config.is_file() else {}


def _assemble(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoders: list, spec: Family, prediction_type: str,
              zero_terminal_snr: bool, source_name: str, source_hash: str,
              passthrough: dict[str, torch.Tensor]) -> ModelBundle:
    for module in (unet, vae, *text_encoders):
        module.eval()
    return _bundle(unet, vae, text_encoders, spec, prediction_type, zero_terminal_snr, source_name, source_hash,
                   passthrough)
