"""The shipped config folders (trainer/configs/sd1, sd2, sdxl) are what diffusers needs to load our single-file output
offline: `StableDiffusionPipeline.from_single_file(path, config=<folder>)` (StableDiffusionXLPipeline for SDXL), no
model hub."""
from __future__ import annotations

import json
import logging
from typing import Callable

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from trainer.checkpoint import save_checkpoint
from trainer.models import CONFIG_DIR, ModelBundle, build_bundle, load_tokenizer, make_noise_scheduler, shipped_configs

PREDICTION_TYPES = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}  # SD1.5, SD2.1 (768-v), SDXL base
SCHEDULERS = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler"}  # as their repos ship
MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL only


def full_size_bundle(family: str) -> tuple[ModelBundle, Callable[[], None]]:
    """SD1.5/SD2.1/SDXL-shaped fp16 modules in seconds: built on the meta device, then each weight a copy of a random
    window of one shared pool, so that no two tensors match by chance and a misplaced one cannot go unnoticed.
    Also returns a function that makes the weights views of the pool: the same values without their 2-3 GB."""
    configs = shipped_configs(family)
    with torch.device("meta"):
        bundle = build_bundle(family, PREDICTION_TYPES[family], configs.unet, configs.vae, configs.text,
                              text_config_2=configs.text_2)
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(1 << 27, generator=generator, dtype=torch.float16)
    windows = []
    for module in bundle.modules:
        module.to(torch.float16)  # fp16 from the start: the file's dtype, half the memory
        module.to_empty(device="cpu")
        for parameter in module.parameters():
            start = int(torch.randint(pool.numel() - parameter.numel(), (1,), generator=generator))
            window = pool[start:start + parameter.numel()].view(parameter.shape)
            parameter.data = window.clone()  # safetensors refuses to save tensors that share memory
            windows.append((parameter, window))

    def share_pool() -> None:
        for parameter, window in windows:
            parameter.data = window

    return bundle, share_pool


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_two_tokenizer_folders_differ_only_in_the_pad_token():
    # diffusers reads the tokenizer from <config>/tokenizer/ only, so each family carries the files; git stores
    # identical files once, and this keeps them identical.
    sd1, sd2 = CONFIG_DIR / "sd1" / "tokenizer", CONFIG_DIR / "sd2" / "tokenizer"
    assert sorted(file.name for file in sd1.iterdir()) == sorted(file.name for file in sd2.iterdir())
    for name in ("vocab.json", "merges.txt"):
        assert (sd1 / name).read_bytes() == (sd2 / name).read_bytes(), name
    config1, config2 = (json.loads((folder / "tokenizer_config.json").read_text()) for folder in (sd1, sd2))
    assert {**config1, "pad_token": "!"} == config2
    # SD1's CLIP-L pads with <|endoftext|>; SD2's OpenCLIP-H with "!", id 0, as its original code did.
    assert (load_tokenizer("sd1").pad_token_id, load_tokenizer("sd2").pad_token_id) == (49407, 0)


def test_sdxl_tokenizers_are_sd1s_and_sd2s():
    # SDXL's first encoder is SD1's CLIP-L (padding <|endoftext|>), its second an OpenCLIP like SD2's (padding "!").
    for xl, same in (("tokenizer", CONFIG_DIR / "sd1" / "tokenizer"), ("tokenizer_2", CONFIG_DIR / "sd2" / "tokenizer")):
        folder = CONFIG_DIR / "sdxl" / xl
        assert sorted(file.name for file in folder.iterdir()) == sorted(file.name for file in same.iterdir())
        assert all((folder / file.name).read_bytes() == file.read_bytes() for file in same.iterdir()), xl


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_folder_scheduler_samples_the_schedule_we_train_with(family):
    folder = CONFIG_DIR / family
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", SCHEDULERS[family]]
    scheduler = getattr(diffusers, SCHEDULERS[family]).from_pretrained(str(folder), subfolder="scheduler",
                                                                        local_files_only=True)
    assert scheduler.config.prediction_type == PREDICTION_TYPES[family]
    assert torch.equal(scheduler.alphas_cumprod, make_noise_scheduler(PREDICTION_TYPES[family]).alphas_cumprod)


def test_sd2_epsilon_files_get_the_readme_scheduler():
    # SD2's 512 px base models predict epsilon; the README passes this scheduler for them.
    scheduler = DDIMScheduler.from_pretrained(str(CONFIG_DIR / "sd2"), subfolder="scheduler", prediction_type="epsilon",
                                              local_files_only=True)
    assert scheduler.config.prediction_type == "epsilon"
    assert torch.equal(scheduler.alphas_cumprod, make_noise_scheduler("epsilon").alphas_cumprod)


@pytest.mark.slow  # 10-25 s a family; with accelerate (requirements-dev.txt) diffusers needs no more RAM than the file
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_loads_our_checkpoint_with_the_shipped_folder(tmp_path, family):
    bundle, share_pool = full_size_bundle(family)
    path = tmp_path / f"{family}.safetensors"
    save_checkpoint(bundle, path, {}, dtype=torch.float16)
    share_pool()  # frees the copies before diffusers allocates its own modules

    # diffusers reports unused checkpoint weights as a warning on its own logger, which does not propagate.
    warnings = Warnings()
    logging.getLogger("diffusers").addHandler(warnings)
    try:
        pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        pipe = pipeline.from_single_file(str(path), config=str(CONFIG_DIR / family), local_files_only=True,
                                         torch_dtype=torch.float16)
    finally:
        logging.getLogger("diffusers").removeHandler(warnings)
        path.unlink()  # 2-7 GB; pytest keeps the temporary folders of the last three runs
    # (Besides diffusers' note on its own fp16 cast of modules it would keep in fp32, which is not about the file.)
    assert [message for message in warnings.messages if not message.startswith("There are modules in")] == []

    # Same names and bit-identical values: a weight diffusers did not find would keep its fresh initialisation.
    for name in MODULES:
        if getattr(bundle, name, None) is None:
            assert getattr(pipe, name, None) is None, name
            continue
        got, want = getattr(pipe, name).state_dict(), getattr(bundle, name).state_dict()
        assert got.keys() == want.keys(), name
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor.to(got[key].dtype)), f"{name}: {key}"
    assert type(pipe.scheduler).__name__ == SCHEDULERS[family]
    assert pipe.scheduler.config.prediction_type == PREDICTION_TYPES[family]
    assert pipe.tokenizer.pad_token == load_tokenizer(family).pad_token
    if family == "sdxl":
        assert pipe.tokenizer_2.pad_token == load_tokenizer(family, "tokenizer_2").pad_token == "!"
    else:
        assert pipe.safety_checker is None and pipe.feature_extractor is None
