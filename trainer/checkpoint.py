"""Single-file checkpoints in the original LDM layout, the one ComfyUI and A1111 load.

diffusers converts LDM files to its own layout but has no way back; the export here is that way back. It works
from the modules' own state dicts and configs (number of levels, layers per block, attention or plain blocks), so
tiny test models export exactly like full-size ones. Files are written atomically and never unpickled.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import metadata as meta
from .atomic import replacing

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .families import Family

    from .bundle import ModelBundle

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
V_PRED_KEY = "v_pred"  # ComfyUI's marker for v-prediction checkpoints: an empty tensor
ZTSNR_KEY = "ztsnr"  # beside v_pred: trained with zero terminal SNR (some SDXL descendants); ComfyUI reads it too

SPEC_PREDICTION_TYPE = {"epsilon": "epsilon", "v_prediction": "v"}  # diffusers name -> ModelSpec name

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class ModelLoadError(ValueError):
    """A model file or folder that cannot be used; the message names it and says what to do instead."""


# --- diffusers -> LDM names ------------------------------------------------------------------------------------

# Names inside one block, diffusers -> LDM (only the start of the rest of the key is renamed).
_UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
                "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_SAME: dict[str, str] = {}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding", "final_layer_norm.": "ln_final."}
_OPEN_CLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
                    "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj."}

Blocks = dict[str, tuple[str, dict[str, str]]]  # diffusers block prefix -> (LDM block prefix, renames inside it)


def _unet_blocks(config: dict, keys: set[str]) -> Blocks:
    per_level = config["layers_per_block"] + 1  # LDM numbers a level's resnets and its down/upsampler in one row
    blocks: Blocks = {
        "conv_in.": ("input_blocks.0.0.", _SAME),
        "time_embedding.linear_1.": ("time_embed.0.", _SAME),
        "time_embedding.linear_2.": ("time_embed.2.", _SAME),
        "add_embedding.linear_1.": ("label_emb.0.0.", _SAME),  # SDXL's text-time embedding
        "add_embedding.linear_2.": ("label_emb.0.2.", _SAME),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", _SAME),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
        "conv_norm_out.": ("out.0.", _SAME),
        "conv_out.": ("out.2.", _SAME),
    }
    for level in range(len(config["block_out_channels"])):
        for layer in range(per_level - 1):
            row = 1 + level * per_level + layer
            blocks[f"down_blocks.{level}.resnets.{layer}."] = (f"input_blocks.{row}.0.", _UNET_RESNET)
            blocks[f"down_blocks.{level}.attentions.{layer}."] = (f"input_blocks.{row}.1.", _SAME)
        blocks[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{(level + 1) * per_level}.0.op.", _SAME)
        for layer in range(per_level):
            row = level * per_level + layer
            blocks[f"up_blocks.{level}.resnets.{layer}."] = (f"output_blocks.{row}.0.", _UNET_RESNET)
            blocks[f"up_blocks.{level}.attentions.{layer}."] = (f"output_blocks.{row}.1.", _SAME)
        # The upsampler follows the last resnet, after its attention where the level has one.
        slot = 2 if any(key.startswith(f"up_blocks.{level}.attentions.") for key in keys) else 1
        blocks[f"up_blocks.{level}.upsamplers.0.conv."] = (f"output_blocks.{(level + 1) * per_level - 1}.{slot}.conv.",
                                                           _SAME)
    return blocks


def _vae_blocks(config: dict) -> Blocks:
    levels = len(config["block_out_channels"])
    resnets = config["layers_per_block"]
    blocks: Blocks = {"quant_conv.": ("quant_conv.", _SAME), "post_quant_conv.": ("post_quant_conv.", _SAME)}
    for part in ("encoder", "decoder"):
        blocks[f"{part}.conv_in."] = (f"{part}.conv_in.", _SAME)
        blocks[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", _SAME)
        blocks[f"{part}.conv_out."] = (f"{part}.conv_out.", _SAME)
        blocks[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", _VAE_RESNET)
        blocks[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", _VAE_RESNET)
        blocks[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
    for level in range(levels):
        down, up = f"encoder.down.{level}.", f"decoder.up.{levels - 1 - level}."  # LDM's decoder counts upwards
        for layer in range(resnets):
            blocks[f"encoder.down_blocks.{level}.resnets.{layer}."] = (f"{down}block.{layer}.", _VAE_RESNET)
        blocks[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = (f"{down}downsample.conv.", _SAME)
        for layer in range(resnets + 1):
            blocks[f"decoder.up_blocks.{level}.resnets.{layer}."] = (f"{up}block.{layer}.", _VAE_RESNET)
        blocks[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = (f"{up}upsample.conv.", _SAME)
    return blocks


def _renamed_start(rest: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _block_of(key: str, blocks: Blocks) -> str | None:
    parts = key.split(".")
    for length in range(len(parts) - 1, 0, -1):
        block = ".".join(parts[:length]) + "."
        if block in blocks:
            return block
    return None


def _rename(state: dict[str, torch.Tensor], blocks: Blocks, prefix: str, what: str) -> dict[str, torch.Tensor]:
    """Rename every key by its longest matching block prefix; a key with no LDM home is an unsupported layout."""
    out = {}
    for key, tensor in state.items():
        block = _block_of(key, blocks)
        if block is None:
            raise ValueError(f"{what} weight {key!r} has no place in the LDM checkpoint layout; "
                             "only SD1.x/SD2.x/SDXL-style models can be exported")
        ldm_block, renames = blocks[block]
        out[prefix + ldm_block + _renamed_start(key[len(block):], renames)] = tensor
    return out


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    state = unet.state_dict()
    return _rename(state, _unet_blocks(dict(unet.config), set(state)), UNET_PREFIX, "UNet")


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    renamed = _rename(vae.state_dict(), _vae_blocks(dict(vae.config)), VAE_PREFIX, "VAE")
    # LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
    return {key: tensor[:, :, None, None] if ".mid.attn_1." in key and tensor.ndim == 2 else tensor
            for key, tensor in renamed.items()}


def _clip_state(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    # transformers 4 names the weights text_model.*, transformers 5 drops that prefix; work without it.
    return {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()}


def _open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP names -> OpenCLIP names, merging each layer's q/k/v projections into one in_proj."""
    out = {}
    for key, tensor in state.items():
        if key == "text_projection.weight":  # OpenCLIP multiplies x @ text_projection: the Linear's transpose
            out[prefix + "text_projection"] = tensor.T
            continue
        if not key.startswith("encoder.layers."):
            out[prefix + _renamed_start(key, _OPEN_CLIP_TOP)] = tensor
            continue
        layer, rest = key[len("encoder.layers."):].split(".", 1)
        block = f"{prefix}transformer.resblocks.{layer}."
        if rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]  # weight or bias
            qkv = [state[key.replace(".q_proj.", f".{name}_proj.")] for name in ("q", "k", "v")]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
        elif not rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            out[block + _renamed_start(rest, _OPEN_CLIP_LAYER)] = tensor
    return out


def text_encoders_to_ldm(text_encoders: list[torch.nn.Module], family: Family) -> dict[str, torch.Tensor]:
    """Each text encoder under its family's single-file prefix, in CLIP or OpenCLIP layout."""
    out = {}
    for encoder, slot in zip(text_encoders, family.text_encoders, strict=True):
        state = _clip_state(encoder)
        out.update(_open_clip(state, slot.prefix) if slot.open_clip
                   else {slot.prefix + key: tensor for key, tensor in state.items()})
    return out


def modules_to_ldm(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoders: list[torch.nn.Module],
                   family: Family) -> dict[str, torch.Tensor]:
    """The modules' weights under their LDM names (works on meta-device modules too: names and shapes)."""
    return {**unet_to_ldm(unet), **vae_to_ldm(vae), **text_encoders_to_ldm(text_encoders, family)}


def ldm_state_dict(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """Everything a single-file checkpoint of this bundle holds: the modules, the base file's unused tensors and
    ComfyUI's v-prediction (and zero-terminal-SNR) markers."""
    state = dict(bundle.passthrough)
    state.update(modules_to_ldm(bundle.unet, bundle.vae, bundle.text_encoders, bundle.spec))
    if bundle.prediction_type == "v_prediction":
        state[V_PRED_KEY] = torch.tensor([])
    if bundle.zero_terminal_snr:
        state[ZTSNR_KEY] = torch.tensor([])
    return state


# --- metadata --------------------------------------------------------------------------------------------------

def _config_json(config) -> str:
    if hasattr(config, "to_diff_dict"):  # a transformers config
        return json.dumps(config.to_diff_dict(), sort_keys=True)
    return json.dumps({key: value for key, value in dict(config).items() if not key.startswith("_")}, sort_keys=True)


def format_metadata(bundle: ModelBundle) -> dict[str, str]:
    """The metadata keys save_checkpoint owns: ModelSpec's description of the model and our module configs."""
    return {
        meta.SPEC_VERSION: "1.0.0",
        meta.ARCHITECTURE: bundle.spec.architecture(bundle.prediction_type),
        meta.IMPLEMENTATION: bundle.spec.implementation,
        meta.PREDICTION_TYPE: SPEC_PREDICTION_TYPE[bundle.prediction_type],
        meta.DATE: datetime.now().astimezone().isoformat(timespec="seconds"),
        meta.CONFIGS["unet"]: _config_json(bundle.unet.config),
        meta.CONFIGS["vae"]: _config_json(bundle.vae.config),
        **{meta.CONFIGS[part]: _config_json(encoder.config)
           for part, encoder in zip(("text", "text_2"), bundle.text_encoders)},
    }


# --- writing ---------------------------------------------------------------------------------------------------

def save_checkpoint(bundle: ModelBundle, path: str | os.PathLike, metadata: dict[str, str],
                    dtype: torch.dtype = torch.float16) -> None:
    """Write the bundle as one LDM-layout .safetensors file, atomically: `path` is either the complete new file
    or whatever was there before. Floating-point tensors are stored as `dtype`. The caller's metadata (title,
    trigger phrase, training settings...) is kept; the keys of format_metadata() are always ours."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"Checkpoints are written as .safetensors files; {str(path)!r} has another extension.")
    not_text = sorted(key for key, value in metadata.items() if not isinstance(value, str))
    if not_text:
        raise TypeError(f"safetensors metadata values must be strings; these are not: {not_text}")
    tensors = {key: _for_file(tensor, dtype) for key, tensor in ldm_state_dict(bundle).items()}
    _write_atomically(path, tensors, {**metadata, **format_metadata(bundle)})


def _for_file(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    target = dtype if tensor.is_floating_point() else tensor.dtype  # integer buffers keep their type
    return tensor.detach().to("cpu", target).contiguous()


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing(path) as temp:
            save_file(tensors, temp, metadata=metadata)
            _fsync(temp)
            _check_complete(temp, path)
    except BaseException as exc:
        needed = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        if isinstance(exc, Exception) and _out_of_space(exc, path.parent, needed):
            free = shutil.disk_usage(path.parent).free
            raise OSError(errno.ENOSPC, f"Not enough disk space to save {path}: the checkpoint needs about "
                                        f"{_gb(needed)} and {_gb(free)} is free there. Free some space or choose "
                                        "another output folder.") from exc
        raise
    _fsync_directory(path.parent)


def _out_of_space(exc: Exception, folder: Path, needed: int) -> bool:
    # safetensors reports a full disk as a SafetensorError, not an OSError, so also look at the free space left.
    return getattr(exc, "errno", None) == errno.ENOSPC or shutil.disk_usage(folder).free < needed


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def _fsync(path: Path) -> None:
    with open(path, "r+b") as file:
        os.fsync(file.fileno())


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable (POSIX only; Windows cannot open a directory for this)."""
    if os.name == "nt":
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _check_complete(temp: Path, path: Path) -> None:
    """Re-open the written file: safetensors checks the data covers the header, which catches a short write."""
    try:
        with safe_open(str(temp), framework="pt"):
            pass
    except SafetensorError as exc:
        raise OSError(errno.EIO, f"Writing {path} did not complete ({exc}); the previous file, if any, is "
                                 "unchanged. Check the disk and save again.") from exc


# --- reading ---------------------------------------------------------------------------------------------------

def _pickle_message(path: Path, how: str) -> str:
    return (f"{path} {how}. Loading a pickle can run arbitrary code, so this pack only loads .safetensors files. "
            "Convert it once on a machine you trust, e.g. load it in ComfyUI and save it with the CheckpointSave "
            "node (or convert it with a pickle-to-safetensors tool), then choose the .safetensors file.")


def _check_path(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"Model file not found: {path}. Check the name, or put the checkpoint in ComfyUI's "
                             "models/checkpoints folder.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(_pickle_message(path, f"is a pickled PyTorch checkpoint ({path.suffix})"))
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path} is not a .safetensors file. Choose a single-file .safetensors checkpoint "
                             "or a diffusers folder (with model_index.json).")


def _unreadable(path: Path, exc: Exception) -> ModelLoadError:
    with open(path, "rb") as file:
        start = file.read(4)
    if start.startswith((b"PK\x03\x04", b"\x80")):  # a zip or pickle stream: a renamed torch.save file
        return ModelLoadError(_pickle_message(path, "is a pickled PyTorch checkpoint renamed to .safetensors"))
    return ModelLoadError(f"{path} could not be read as a .safetensors file ({exc}). It is probably truncated or "
                          "corrupt, e.g. from an interrupted download or copy: download or export it again.")


@contextmanager
def open_checkpoint(path: str | os.PathLike) -> Iterator:
    """safe_open() with clear errors for a missing, pickled, truncated or corrupt file. Never unpickles."""
    path = Path(path)
    _check_path(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from exc
    with handle as file:
        yield file


def read_tensor(file, path: str | os.PathLike, key: str) -> torch.Tensor:
    try:
        return file.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise _unreadable(Path(path), exc) from exc


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a .safetensors file ({} when it has none)."""
    with open_checkpoint(path) as file:
        return dict(file.metadata() or {})


def read_trigger_phrase(path: str | os.PathLike) -> str:
    """The trigger phrase a checkpoint of ours carries ('' for other checkpoints), from the header only."""
    return read_metadata(path).get(meta.TRIGGER_PHRASE, "")


# --- output names ----------------------------------------------------------------------------------------------

_FORBIDDEN_IN_NAME = set('/\\:*?"<>|') | {chr(c) for c in range(32)}


def output_path(folder: str | os.PathLike, name: str) -> Path:
    """`folder/name.safetensors` for a name typed by a user, refusing anything that could land outside `folder`."""
    stem = name.strip().removesuffix(".safetensors")
    bad = sorted(_FORBIDDEN_IN_NAME.intersection(stem))
    if not stem or stem in (".", "..") or stem.startswith(".") or bad:
        shown = ", ".join(repr(c) for c in bad) or "a leading dot"
        raise ValueError(f"Output name {name!r} is not a plain file name ({shown if stem else 'it is empty'}). "
                         "Use letters, digits, spaces, '-' or '_', e.g. 'zwx-dog'; the file goes into "
                         f"{Path(folder)}.")
    return Path(folder) / f"{stem}.safetensors"
