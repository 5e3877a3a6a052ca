"""load_model: single-file LDM checkpoints and diffusers folders in, a ModelBundle out; clear refusals otherwise."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from tests.test_checkpoint import MODULES, distinct_bundle, randomized
from tests.tiny import tiny_bundle, tiny_text_config, tiny_unet_config, tiny_vae_config
from trainer import models
from trainer.checkpoint import ldm_state_dict, read_metadata, save_checkpoint
from trainer.bundle import ModelBundle
from trainer.models import ModelLoadError, build_bundle, file_sha256, load_model, shipped_configs

V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"  # ComfyUI's SD2 v-pred probe


def assert_same_modules(loaded: ModelBundle, original: ModelBundle, keys=None) -> None:
    """Same names, dtypes and (for `keys`, default all) bit-identical values."""
    for name in MODULES:
        assert (getattr(loaded, name) is None) == (getattr(original, name) is None), name
        if getattr(original, name) is None:
            continue
        got, want = getattr(loaded, name).state_dict(), getattr(original, name).state_dict()
        assert got.keys() == want.keys(), name
        for key in want if keys is None else keys(list(want)):
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), f"{name}: {key}"


def export(bundle: ModelBundle, path: Path, metadata: dict | None = None) -> Path:
    save_checkpoint(bundle, path, metadata or {}, dtype=torch.float32)
    return path


def rewrite(path: Path, keep=lambda key: True, rename=lambda key: key, add: dict | None = None,
            metadata: dict | None = None) -> Path:
    """Edit a checkpoint file: keep/rename/add tensors; metadata entries set to None are removed."""
    tensors = {rename(key): tensor for key, tensor in load_file(path).items() if keep(key)}
    merged = {**read_metadata(path), **(metadata or {})}
    save_file({**tensors, **(add or {})}, path, metadata={k: v for k, v in merged.items() if v is not None})
    return path


# --- loading what we export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, prediction_type", [("sd1", "epsilon"), ("sd2", "v_prediction"),
                                                     ("sdxl", "epsilon"), ("sdxl", "v_prediction")])
def test_load_returns_the_exported_modules_bit_for_bit(tmp_path, family, prediction_type):
    original = distinct_bundle(family, prediction_type)
    path = export(original, tmp_path / "subject.safetensors")
    loaded = load_model(path)
    assert_same_modules(loaded, original)
    assert (loaded.family, loaded.prediction_type) == (family, prediction_type)
    assert loaded.source_name == "subject.safetensors"
    assert loaded.source_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.passthrough == {}
    ids = loaded.tokenizer("a sks dog", padding="max_length", return_tensors="pt").input_ids
    assert ids[0, :5].tolist() == [49406, 320, 48136, 1929, 49407]
    with torch.no_grad():  # also checks what no state dict holds, e.g. CLIP's position ids
        for got, want in zip(loaded.text_encoders, original.text_encoders, strict=True):
            assert torch.equal(got(ids).last_hidden_state, want(ids).last_hidden_state)
    assert all(parameter.requires_grad for parameter in loaded.unet.parameters())
    if family == "sdxl":  # the second tokenizer pads with "!" (id 0), as OpenCLIP does
        ids_2 = loaded.tokenizer_2("a sks dog", padding="max_length", return_tensors="pt").input_ids
        assert ids_2[0, :6].tolist() == [49406, 320, 48136, 1929, 49407, 0]
        assert ids[0, 5].item() == 49407


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_load_casts_to_the_requested_dtype(tmp_path, family):
    original = distinct_bundle(family)
    loaded = load_model(export(original, tmp_path / "model.safetensors"), dtype=torch.float16)
    assert len(loaded.modules) == len(original.modules)
    assert {p.dtype for module in loaded.modules for p in module.parameters()} == {torch.float16}
    assert torch.equal(loaded.unet.conv_in.weight, original.unet.conv_in.weight.half())


@pytest.mark.parametrize("drop_marker, metadata, expected", [
    (True, {}, "v_prediction"),  # ModelSpec metadata alone
    (False, {"modelspec.prediction_type": None}, "v_prediction"),  # ComfyUI's v_pred key alone
    (True, {"modelspec.prediction_type": None, "modelspec.predict_key": "v"}, "v_prediction"),  # ComfyUI's spelling
    (False, {"modelspec.prediction_type": "epsilon"}, "epsilon"),  # metadata outranks the key
    (True, {"modelspec.prediction_type": None}, "epsilon"),  # nothing said: SD1 is epsilon
])
def test_prediction_type_comes_from_metadata_then_the_v_pred_key(tmp_path, drop_marker, metadata, expected):
    path = export(distinct_bundle("sd1", "v_prediction"), tmp_path / "model.safetensors")
    rewrite(path, keep=lambda key: not (drop_marker and key == "v_pred"), metadata=metadata)
    assert load_model(path).prediction_type == expected


@pytest.mark.parametrize("stored, override", [("v_prediction", "epsilon"), ("epsilon", "v_prediction")])
def test_explicit_prediction_type_overrides_the_file(tmp_path, stored, override):
    path = export(distinct_bundle("sd2", stored), tmp_path / "model.safetensors")
    loaded = load_model(path, prediction_type=override)
    assert loaded.prediction_type == loaded.noise_scheduler.config.prediction_type == override
    # The file's v_pred marker is not carried along: the export writes the one the bundle now needs.
    assert ("v_pred" in ldm_state_dict(loaded)) == (override == "v_prediction")


def test_an_invalid_prediction_type_is_refused(tmp_path):
    path = export(distinct_bundle("sd1"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="v_prediction"):
        load_model(path, prediction_type="v")
    rewrite(path, metadata={"modelspec.prediction_type": "flow"})
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*'flow'.*prediction_type="):
        load_model(path)


def four_level_sd2_bundle() -> ModelBundle:
    """A tiny SD2 model with SD's four UNet levels, so the UNet has LDM's output_blocks.11."""
    unet = {**tiny_unet_config("sd2"), "block_out_channels": [32, 32, 64, 64], "attention_head_dim": [2, 2, 4, 4],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    torch.manual_seed(0)
    return randomized(build_bundle("sd2", "epsilon", unet, tiny_vae_config(), tiny_text_config("sd2")))


@pytest.mark.parametrize("spread, expected", [(0.5, "v_prediction"), (0.01, "epsilon")])
def test_sd2_without_a_stated_type_follows_comfyui(tmp_path, spread, expected):
    bundle = four_level_sd2_bundle()
    with torch.no_grad():
        bundle.unet.up_blocks[3].attentions[2].transformer_blocks[0].norm1.bias.normal_(0.0, spread)
    path = rewrite(export(bundle, tmp_path / "model.safetensors"), metadata={"modelspec.prediction_type": None})
    assert V_PROBE in load_file(path) and "v_pred" not in load_file(path)
    assert load_model(path).prediction_type == expected


# --- layouts and passthrough ------------------------------------------------------------------------------------

def test_sd1_text_keys_without_text_model_prefix_load(tmp_path):
    original = distinct_bundle("sd1")
    path = rewrite(export(original, tmp_path / "old.safetensors"),
                   rename=lambda key: key.replace("cond_stage_model.transformer.text_model.",
                                                  "cond_stage_model.transformer."))
    assert not any(".text_model." in key for key in load_file(path))
    loaded = load_model(path)
    assert_same_modules(loaded, original)
    assert loaded.passthrough == {}


def test_unused_tensors_are_kept_and_exported_again(tmp_path):
    original = distinct_bundle("sd2")
    hidden = original.text_encoder.config.hidden_size
    # What a real SD2 file carries beyond diffusers' modules: OpenCLIP's last layer (here the 3rd), the projection
    # and logit scale, the schedule buffers; plus an EMA copy, which goes stale once we fine-tune.
    extra = {"cond_stage_model.model.transformer.resblocks.2.ln_1.weight": torch.randn(hidden),
             "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight": torch.randn(3 * hidden, hidden),
             "cond_stage_model.model.text_projection": torch.randn(hidden, hidden),
             "cond_stage_model.model.logit_scale": torch.tensor(4.6),
             "alphas_cumprod": torch.rand(1000)}
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.diffusion_modelconv_inweight": torch.randn(3)}
    path = rewrite(export(original, tmp_path / "base.safetensors"), add={**extra, **ema})

    loaded = load_model(path)
    assert_same_modules(loaded, original)
    assert loaded.passthrough.keys() == extra.keys()
    again = export(loaded, tmp_path / "trained.safetensors")
    written = load_file(again)
    assert all(torch.equal(written[key], tensor) for key, tensor in extra.items())
    assert not any(key.startswith("model_ema.") for key in written)


# --- full-size models from the shipped configs --------------------------------------------------------------------

def full_size_bundle(family: str, prediction_type: str = "epsilon") -> ModelBundle:
    """SD1.5/SD2.1-shaped fp16 modules with random weights, built without the slow default initialisation."""
    configs = shipped_configs(family)
    with torch.device("meta"):
        modules = (UNet2DConditionModel.from_config(configs.unet), AutoencoderKL.from_config(configs.vae),
                   CLIPTextModel(CLIPTextConfig.from_dict(configs.text)))
    # Each weight is a copy of a random window of one shared pool: distinct values, at the cost of a memcpy.
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(1 << 26, generator=generator, dtype=torch.float16)
    for module in modules:
        module.to_empty(device="cpu")
        for parameter in module.parameters():
            start = int(torch.randint(pool.numel() - parameter.numel(), (1,), generator=generator))
            parameter.data = pool[start:start + parameter.numel()].view(parameter.shape).clone()
    return ModelBundle(*modules, tokenizer=None, noise_scheduler=models.make_noise_scheduler(prediction_type),
                       family=family)


# Names and shapes of the well-known SD1.5 / SD2.1 single-file layout, written down independently of our code.
SD_UNET_SHAPES = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias": (320,),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.decoder.up.0.block.0.conv1.weight": (128, 256, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
}
SD1_SHAPES = {
    **SD_UNET_SHAPES,
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
}
SD2_SHAPES = {
    **SD_UNET_SHAPES,
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 1024),
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
    "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
    "cond_stage_model.model.ln_final.weight": (1024,),
}
# (UNet, VAE, text encoder) tensor counts: SD1.5's CLIP-L has 12 layers; diffusers keeps 23 of OpenCLIP-H's 24.
KEY_COUNTS = {"sd1": (686, 248, 196), "sd2": (686, 248, 23 * 12 + 4)}


def sd2_extras() -> dict[str, torch.Tensor]:
    """The tensors of a real SD2.1 file that diffusers does not use: OpenCLIP's 24th layer, projection, scale."""
    layer = "cond_stage_model.model.transformer.resblocks.23."
    shapes = {"ln_1.weight": (1024,), "ln_1.bias": (1024,), "attn.in_proj_weight": (3072, 1024),
              "attn.in_proj_bias": (3072,), "attn.out_proj.weight": (1024, 1024), "attn.out_proj.bias": (1024,),
              "ln_2.weight": (1024,), "ln_2.bias": (1024,), "mlp.c_fc.weight": (4096, 1024),
              "mlp.c_fc.bias": (4096,), "mlp.c_proj.weight": (1024, 4096), "mlp.c_proj.bias": (1024,)}
    extras = {layer + name: torch.randn(shape, dtype=torch.float16) for name, shape in shapes.items()}
    extras["cond_stage_model.model.text_projection"] = torch.randn(1024, 1024, dtype=torch.float16)
    extras["cond_stage_model.model.logit_scale"] = torch.tensor(4.6, dtype=torch.float16)
    return extras


@pytest.mark.parametrize("family, expected_prediction", [
    ("sd1", "epsilon"),
    # random norm biases have std ~1 > 0.09: by ComfyUI's rule this SD2 file is v-prediction
    ("sd2", "v_prediction"),
])
@pytest.mark.slow
def test_full_size_checkpoint_without_our_metadata_loads_through_shipped_configs(tmp_path, family,
                                                                                 expected_prediction):
    original = full_size_bundle(family)
    ldm = ldm_state_dict(original)  # epsilon bundle: no v_pred key, and no metadata at all
    for key, shape in (SD1_SHAPES if family == "sd1" else SD2_SHAPES).items():
        assert tuple(ldm[key].shape) == shape, key
    counts = tuple(sum(key.startswith(prefix) for key in ldm)
                   for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
    assert counts == KEY_COUNTS[family]
    extras = sd2_extras() if family == "sd2" else {}
    path = tmp_path / f"{family}-base.safetensors"
    save_file({**{key: tensor.contiguous() for key, tensor in ldm.items()}, **extras}, path)
    del ldm

    loaded = load_model(path, dtype=torch.float16)
    assert (loaded.family, loaded.prediction_type) == (family, expected_prediction)
    assert loaded.passthrough.keys() == extras.keys()
    assert_same_modules(loaded, original, keys=lambda names: names[::20] + [n for n in names if "attn_1" in n])


# --- diffusers folders --------------------------------------------------------------------------------------------

def save_diffusers_folder(bundle: ModelBundle, folder: Path, scheduler_prediction: str | None,
                          zero_snr: bool = False) -> Path:
    for name in MODULES:
        if getattr(bundle, name) is not None:
            getattr(bundle, name).save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    if scheduler_prediction:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "DDPMScheduler", "prediction_type": scheduler_prediction,
             "rescale_betas_zero_snr": zero_snr}))
    return folder


def test_diffusers_folders_load(tmp_path):
    sd1, sd2 = distinct_bundle("sd1"), distinct_bundle("sd2", "v_prediction")
    loaded_sd1 = load_model(save_diffusers_folder(sd1, tmp_path / "sd1-model", None))
    loaded_sd2 = load_model(save_diffusers_folder(sd2, tmp_path / "sd2-model", "v_prediction"))
    assert_same_modules(loaded_sd1, sd1)
    assert_same_modules(loaded_sd2, sd2)
    assert (loaded_sd1.family, loaded_sd1.prediction_type) == ("sd1", "epsilon")
    assert (loaded_sd2.family, loaded_sd2.prediction_type) == ("sd2", "v_prediction")
    assert loaded_sd2.source_name == "sd2-model"
    assert len(loaded_sd1.source_hash) == 64 and loaded_sd1.source_hash != loaded_sd2.source_hash


def test_sdxl_diffusers_folder_loads_with_its_zero_snr_schedule(tmp_path):
    sdxl = distinct_bundle("sdxl")
    loaded = load_model(save_diffusers_folder(sdxl, tmp_path / "xl-model", "v_prediction", zero_snr=True))
    assert_same_modules(loaded, sdxl)
    assert (loaded.family, loaded.prediction_type, loaded.zero_terminal_snr) == ("sdxl", "v_prediction", True)
    assert loaded.noise_scheduler.alphas_cumprod[-1] < 1e-6  # the last step is pure noise


def test_sdxl_prediction_markers_round_trip_and_can_be_overridden(tmp_path):
    path = export(tiny_bundle("sdxl", "v_prediction", zero_terminal_snr=True), tmp_path / "noob-vpred.safetensors")
    assert {"v_pred", "ztsnr"} <= load_file(path).keys()  # what ComfyUI reads for SDXL descendants
    loaded = load_model(path)
    assert (loaded.prediction_type, loaded.zero_terminal_snr) == ("v_prediction", True)
    assert "v_pred" not in loaded.passthrough and "ztsnr" not in loaded.passthrough
    plain = load_model(path, "epsilon", zero_terminal_snr=False)
    assert (plain.prediction_type, plain.zero_terminal_snr) == ("epsilon", False)
    assert load_model(export(tiny_bundle("sdxl"), tmp_path / "base.safetensors")).zero_terminal_snr is False


def test_file_hash_is_memoised_until_the_file_changes(tmp_path):
    path = export(distinct_bundle("sd1"), tmp_path / "model.safetensors")
    first = file_sha256(path)
    hits = models._sha256.cache_info().hits
    assert file_sha256(path) == first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert models._sha256.cache_info().hits == hits + 1
    export(distinct_bundle("sd1", seed=1), path)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() != first


# --- refusals -----------------------------------------------------------------------------------------------------

def tiny_file(tmp_path: Path, name: str = "model.safetensors") -> Path:
    return export(distinct_bundle("sd1"), tmp_path / name)


def keys_file(tmp_path: Path, keys: list[str], name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    save_file({key: torch.zeros(1) for key in keys}, path)
    return path


class RunsCode:
    """Unpickling this creates a marker file: proof that the loader never unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_are_refused_without_being_opened(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ModelLoadError) as raised:
        load_model(path)
    message = str(raised.value)
    assert path.name in message and "pickle" in message and ".safetensors" in message and "CheckpointSave" in message
    assert not marker.exists()


def _sdxl_refiner(tmp_path):
    return keys_file(tmp_path, ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
                                "conditioner.embedders.0.model.positional_embedding"])


def _sdxl_turbo(tmp_path):
    return export(tiny_bundle("sdxl"), tmp_path / "sd_xl_turbo_1.0.safetensors")


def _sdxl_lightning_by_metadata(tmp_path):
    return export(tiny_bundle("sdxl"), tmp_path / "my-model.safetensors",
                  {"modelspec.title": "Juggernaut XL Lightning"})


def _inpainting(tmp_path):
    path = tiny_file(tmp_path)
    return rewrite(path, add={"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)})


def _truncated(tmp_path):
    path = tiny_file(tmp_path)
    path.write_bytes(path.read_bytes()[:5000])
    return path


def _renamed_pickle(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"state_dict": {}}, path)  # a zip archive under the wrong name
    return path


def _only(prefix):
    return lambda tmp_path: rewrite(tiny_file(tmp_path), keep=lambda key: key.startswith(prefix))


def _without_our_configs(tmp_path):
    ours = {f"dreambooth.{part}_config": None for part in ("unet", "vae", "text")}
    return rewrite(tiny_file(tmp_path), metadata=ours)


@pytest.mark.parametrize("make, expected", [
    (lambda tmp_path: tmp_path / "absent.safetensors", ["not found", "models/checkpoints"]),
    (lambda tmp_path: keys_file(tmp_path, ["x"], "model.gguf"), ["not a .safetensors file", "diffusers folder"]),
    (_renamed_pickle, ["pickle", "CheckpointSave"]),
    (_truncated, ["truncated or corrupt", "download or export it again"]),
    (_sdxl_refiner, ["SDXL refiner", "train the SDXL base"]),
    (_sdxl_turbo, ["distilled few-step SDXL", "'turbo'", "Train the SDXL base"]),
    (_sdxl_lightning_by_metadata, ["distilled few-step SDXL", "'lightning'"]),
    (lambda tmp_path: keys_file(tmp_path, ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]),
     ["Stable Diffusion 3", "SD1.x, SD2.x or SDXL"]),
    (lambda tmp_path: keys_file(tmp_path, ["double_blocks.0.img_attn.norm.key_norm.scale"]),
     ["Flux", "SD1.x, SD2.x or SDXL"]),
    (lambda tmp_path: keys_file(tmp_path, ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]),
     ["LoRA", "base checkpoint"]),
    (lambda tmp_path: keys_file(tmp_path, ["down_blocks.0.attentions.0.proj_in.lora_A.weight"]), ["LoRA"]),
    (_inpainting, ["inpainting", "9 input channels", "text-to-image"]),
    (_only("first_stage_model."), ["holds a VAE,", "full checkpoint"]),
    (lambda tmp_path: keys_file(tmp_path, ["encoder.conv_in.weight", "decoder.up.0.block.0.conv1.weight"]),
     ["holds a VAE,", "full checkpoint"]),
    (_only("model.diffusion_model."), ["holds a UNet,", "full checkpoint"]),
    (_without_our_configs, ["does not match the standard SD 1.x layout", "model.diffusion_model.",
                            "choose a standard SD 1.x checkpoint"]),
])
def test_unusable_files_are_refused_with_the_file_and_the_fix(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(ModelLoadError) as raised:
        load_model(path)
    message = str(raised.value)
    assert path.name in message
    for fragment in expected:
        assert fragment in message


def test_a_folder_without_model_index_is_refused(tmp_path):
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match=r"empty-folder.*model_index\.json"):
        load_model(folder)
