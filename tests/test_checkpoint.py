"""Export to the single-file LDM layout, checked against diffusers' own LDM -> diffusers converters."""
from __future__ import annotations

import errno
import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors import SafetensorError
from safetensors.torch import load_file

from tests.tiny import tiny_bundle
from trainer import checkpoint
from trainer.checkpoint import output_path, read_metadata, save_checkpoint
from trainer.bundle import ModelBundle

MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL only
CALLER_METADATA = {
    "modelspec.title": "zwx dog",
    "modelspec.trigger_phrase": "a zwx dog",
    "dreambooth.identifier": "zwx",
    "dreambooth.class_noun": "dog",
    "dreambooth.base_model": "tiny.safetensors",
    "dreambooth.base_model_sha256": "0" * 64,
    "dreambooth.train_config": json.dumps({"steps": 400}),
}


def randomized(bundle: ModelBundle) -> ModelBundle:
    """Give every weight its own random values: fresh norms are all ones and zeros, which would hide swaps."""
    with torch.no_grad():
        for module in bundle.modules:
            for parameter in module.parameters():
                parameter.normal_()
    return bundle


def distinct_bundle(family: str = "sd1", prediction_type: str = "epsilon", seed: int = 0) -> ModelBundle:
    return randomized(tiny_bundle(family, prediction_type, seed))


def without_text_model(state: dict) -> dict:
    # transformers 5 names CLIP weights without the text_model. prefix that the converters (and transformers 4) use.
    return {key.removeprefix("text_model."): tensor for key, tensor in state.items()}


def module_states(bundle: ModelBundle) -> dict[str, dict[str, torch.Tensor]]:
    return {name: without_text_model(getattr(bundle, name).state_dict()) for name in MODULES
            if getattr(bundle, name) is not None}


def diffusers_import(ldm: dict[str, torch.Tensor], bundle: ModelBundle) -> dict[str, dict[str, torch.Tensor]]:
    """LDM -> diffusers with diffusers' own converters (not ours)."""
    if bundle.family == "sd2":
        text = convert_open_clip_checkpoint(bundle.text_encoder, ldm)
    else:
        text = convert_ldm_clip_checkpoint(ldm)
    imported = {"unet": convert_ldm_unet_checkpoint(ldm, dict(bundle.unet.config)),
                "vae": convert_ldm_vae_checkpoint(ldm, dict(bundle.vae.config)),
                "text_encoder": without_text_model(text)}
    if bundle.family == "sdxl":
        imported["text_encoder_2"] = without_text_model(
            convert_open_clip_checkpoint(bundle.text_encoder_2, ldm, prefix="conditioner.embedders.1.model."))
    return imported


def exported(bundle: ModelBundle, tmp_path: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    path = tmp_path / "model.safetensors"
    save_checkpoint(bundle, path, CALLER_METADATA, dtype=dtype)
    return load_file(path)


@pytest.mark.parametrize("family, prediction_type", [("sd1", "epsilon"), ("sd2", "v_prediction"),
                                                     ("sdxl", "epsilon")])
def test_diffusers_converters_read_back_every_weight_exactly(tmp_path, family, prediction_type):
    bundle = distinct_bundle(family, prediction_type)
    imported = diffusers_import(exported(bundle, tmp_path), bundle)
    for name, own in module_states(bundle).items():
        assert imported[name].keys() == own.keys(), name
        for key, tensor in own.items():
            assert torch.equal(imported[name][key], tensor), f"{name}: {key}"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_file_holds_one_ldm_tensor_per_weight_and_nothing_else(tmp_path, family):
    bundle = distinct_bundle(family)
    keys = exported(bundle, tmp_path).keys()
    text_prefix = "conditioner." if family == "sdxl" else "cond_stage_model."
    states = module_states(bundle)
    # OpenCLIP (SD2's encoder, SDXL's second) merges each layer's q, k, v weights and biases (6 tensors) into
    # in_proj_weight and in_proj_bias (2).
    open_clip = bundle.text_encoder_2 if family == "sdxl" else bundle.text_encoder if family == "sd2" else None
    merged = 4 * open_clip.config.num_hidden_layers if open_clip is not None else 0
    text_weights = len(states["text_encoder"]) + len(states.get("text_encoder_2", {}))
    assert sum(key.startswith("model.diffusion_model.") for key in keys) == len(states["unet"])
    assert sum(key.startswith("first_stage_model.") for key in keys) == len(states["vae"])
    assert sum(key.startswith(text_prefix) for key in keys) == text_weights - merged
    assert all(key.startswith(("model.diffusion_model.", "first_stage_model.", text_prefix)) for key in keys)


def test_sdxl_keys_are_where_comfyui_and_a1111_look(tmp_path):
    bundle = distinct_bundle("sdxl")
    ldm = exported(bundle, tmp_path)
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in ldm
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias" in ldm
    bigg = "conditioner.embedders.1.model."
    assert {bigg + "token_embedding.weight", bigg + "positional_embedding", bigg + "ln_final.weight",
            bigg + "transformer.resblocks.1.attn.in_proj_weight"} <= ldm.keys()
    # OpenCLIP applies x @ text_projection: the transpose of transformers' Linear weight.
    assert torch.equal(ldm[bigg + "text_projection"], bundle.text_encoder_2.text_projection.weight.T)
    embedding = bundle.unet.add_embedding
    assert torch.equal(ldm["model.diffusion_model.label_emb.0.0.weight"], embedding.linear_1.weight)
    assert torch.equal(ldm["model.diffusion_model.label_emb.0.2.bias"], embedding.linear_2.bias)
    # The first level has no attention; the second level's two transformer layers keep their numbers.
    assert not any(key.startswith("model.diffusion_model.input_blocks.1.1.") for key in ldm)
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in ldm


def test_sd1_text_encoder_keys_are_where_comfyui_looks(tmp_path):
    keys = exported(distinct_bundle("sd1"), tmp_path).keys()
    text = [key for key in keys if key.startswith("cond_stage_model.")]
    assert text and all(key.startswith("cond_stage_model.transformer.text_model.") for key in text)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.bias" in keys


def test_sd2_text_encoder_is_in_open_clip_layout(tmp_path):
    bundle = distinct_bundle("sd2")
    ldm = exported(bundle, tmp_path)
    text = [key for key in ldm if key.startswith("cond_stage_model.")]
    assert all(key.startswith("cond_stage_model.model.") for key in text)
    assert {"cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding",
            "cond_stage_model.model.ln_final.weight", "cond_stage_model.model.ln_final.bias"} <= set(text)
    layers = [key for key in text if ".transformer." in key]
    assert layers and all(key.startswith("cond_stage_model.model.transformer.resblocks.") for key in layers)
    hidden = bundle.text_encoder.config.hidden_size
    assert ldm["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * hidden, hidden)
    assert "cond_stage_model.model.transformer.resblocks.1.mlp.c_proj.weight" in ldm
    assert not any("q_proj" in key or "fc1" in key or "layer_norm" in key for key in text)


def test_vae_attention_is_stored_as_1x1_convolutions(tmp_path):
    ldm = exported(distinct_bundle("sd1"), tmp_path)
    channels = 64  # the tiny VAE's last level
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            assert ldm[f"first_stage_model.{part}.mid.attn_1.{name}.weight"].shape == (channels, channels, 1, 1)


@pytest.mark.parametrize("family, prediction_type, architecture, spec", [
    ("sd1", "epsilon", "stable-diffusion-v1", "epsilon"),
    ("sd2", "v_prediction", "stable-diffusion-v2-768-v", "v"),
    ("sd2", "epsilon", "stable-diffusion-v2-512", "epsilon"),
    ("sdxl", "epsilon", "stable-diffusion-xl-v1-base", "epsilon"),
    ("sdxl", "v_prediction", "stable-diffusion-xl-v1-base", "v"),
])
def test_metadata_describes_the_model(tmp_path, family, prediction_type, architecture, spec):
    bundle = distinct_bundle(family, prediction_type)
    path = tmp_path / "model.safetensors"
    save_checkpoint(bundle, path, CALLER_METADATA)
    metadata = read_metadata(path)
    assert CALLER_METADATA.items() <= metadata.items()
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.prediction_type"] == spec
    assert abs(datetime.now().astimezone() - datetime.fromisoformat(metadata["modelspec.date"])) < timedelta(minutes=5)
    unet, vae, text = (json.loads(metadata[f"dreambooth.{part}_config"]) for part in ("unet", "vae", "text"))
    assert unet["block_out_channels"] == list(bundle.unet.config.block_out_channels)
    assert unet["cross_attention_dim"] == bundle.unet.config.cross_attention_dim
    assert vae["latent_channels"] == 4
    assert (text["hidden_size"], text["hidden_act"]) == (bundle.text_encoder.config.hidden_size,
                                                         bundle.text_encoder.config.hidden_act)
    assert ("v_pred" in load_file(path)) == (prediction_type == "v_prediction")
    if family == "sdxl":
        text_2 = json.loads(metadata["dreambooth.text_2_config"])
        assert text_2["hidden_size"] == bundle.text_encoder_2.config.hidden_size


def test_weights_are_stored_in_the_requested_dtype(tmp_path):
    bundle = distinct_bundle("sd1")
    ldm = exported(bundle, tmp_path, dtype=torch.float16)
    assert {tensor.dtype for tensor in ldm.values()} == {torch.float16}
    assert torch.equal(ldm["model.diffusion_model.input_blocks.0.0.weight"], bundle.unet.conv_in.weight.half())


def test_a_new_save_replaces_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(distinct_bundle("sd1"), path, {"modelspec.title": "first"})
    save_checkpoint(distinct_bundle("sd1", seed=1), path, {"modelspec.title": "second"})
    assert read_metadata(path)["modelspec.title"] == "second"
    assert [entry.name for entry in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("name", ["model.ckpt", "model", "model.safetensors.tmp"])
def test_refuses_to_write_anything_but_safetensors(tmp_path, name):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_checkpoint(distinct_bundle("sd1"), tmp_path / name, {})
    assert not any(tmp_path.iterdir())


def test_refuses_metadata_that_is_not_text(tmp_path):
    with pytest.raises(TypeError, match="dreambooth.steps"):
        save_checkpoint(distinct_bundle("sd1"), tmp_path / "model.safetensors", {"dreambooth.steps": 400})


def _write_half_then(error: Exception | None):
    """A save_file that writes the file and then cuts it in half, as a disk filling up mid-write would."""
    real_save_file = checkpoint.save_file

    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        if error is not None:
            raise error
    return save_file


@pytest.mark.parametrize("failure", ["os-enospc", "safetensors-disk-full", "silent-short-write"])
def test_a_failed_save_keeps_the_previous_file_intact(tmp_path, monkeypatch, failure):
    path = tmp_path / "model.safetensors"
    save_checkpoint(distinct_bundle("sd1"), path, {"modelspec.title": "previous"})
    before = path.read_bytes()

    error = {"os-enospc": OSError(errno.ENOSPC, "No space left on device"),
             # what safetensors raises on a full disk: no errno, so only the free space tells
             "safetensors-disk-full": SafetensorError("Error while serializing: I/O error (os error 28)"),
             "silent-short-write": None}[failure]
    monkeypatch.setattr(checkpoint, "save_file", _write_half_then(error))
    if failure == "safetensors-disk-full":
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: SimpleNamespace(free=1000))

    with pytest.raises(OSError) as raised:
        save_checkpoint(distinct_bundle("sd1", seed=1), path, {"modelspec.title": "new"})

    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["model.safetensors"]
    message = str(raised.value)
    assert str(path) in message
    if failure == "silent-short-write":
        assert raised.value.errno == errno.EIO and "did not complete" in message
    else:
        assert raised.value.errno == errno.ENOSPC
        assert "Not enough disk space" in message and "free" in message and "GB" in message


@pytest.mark.parametrize("name", ["../evil", "sub/dir", "a\\b", "C:model", "", "  ", ".hidden", "..", "a\nb"])
def test_output_names_that_could_escape_the_folder_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="not a plain file name"):
        output_path(tmp_path, name)


def test_plain_output_names_land_in_the_folder(tmp_path):
    assert output_path(tmp_path, "zwx dog v2") == tmp_path / "zwx dog v2.safetensors"
    assert output_path(tmp_path, "zwx-dog.safetensors") == tmp_path / "zwx-dog.safetensors"


def test_saved_checkpoint_is_readable_like_any_new_file(tmp_path):
    path = tmp_path / "shared.safetensors"
    save_checkpoint(distinct_bundle("sd1"), path, {})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
