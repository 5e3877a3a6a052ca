"""Memory presets: every preset is a valid configuration on GPUs with and without bf16, "auto" picks by the card's
memory, and train() applies them, logs what they chose and trains with those levers."""
import dataclasses
import types

import pytest
import torch

import trainer.device
import trainer.loop
from trainer.callbacks import Callbacks
from trainer.config import ConfigError, TrainConfig
from trainer.fused import FusedBackward
from trainer.presets import PRESETS, apply_preset, preset_for_memory
from tests.test_train import config, images  # noqa: F401 (fixture)
from tests.tiny import tiny_bundle

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread in this module

GIB = 2 ** 30
USER = dict(base_model="m.safetensors", identifier="zwx", class_noun="dog", output="o.safetensors",
            optimizer="adamw", mixed_precision="no", gradient_checkpointing=False, learning_rate=3e-6)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("has_bf16", [True, False])
@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_every_preset_is_a_valid_configuration_and_keeps_the_users_choices(name, has_bf16, train_text_encoder):
    cfg = apply_preset(TrainConfig(**USER, train_text_encoder=train_text_encoder), name, has_bf16)
    cfg.validate()  # e.g. fused_backward with fp16, or bf16_weights without bf16 compute, would be refused here
    assert cfg.memory_preset == name
    assert cfg.train_text_encoder == train_text_encoder and cfg.learning_rate == 3e-6
    assert cfg.instance_prompt == "a zwx dog"


def test_without_bf16_no_preset_needs_it_and_8_gb_keeps_the_fused_step_in_fp32():
    for name in PRESETS:
        cfg = apply_preset(TrainConfig(**USER), name, has_bf16=False)
        assert not cfg.bf16_weights and cfg.mixed_precision != "bf16"
    lean = apply_preset(TrainConfig(**USER), "8 GB", has_bf16=False)
    assert lean.fused_backward and lean.mixed_precision == "no" and lean.optimizer == "adamw8bit"
    with_bf16 = apply_preset(TrainConfig(**USER), "8 GB", has_bf16=True)
    assert with_bf16.fused_backward and with_bf16.bf16_weights and with_bf16.mixed_precision == "bf16"


def test_the_smaller_the_preset_the_leaner_its_levers():
    def lean_levers(name):
        cfg = apply_preset(TrainConfig(**USER), name, has_bf16=True)
        return (cfg.gradient_checkpointing + (cfg.optimizer == "adamw8bit") + cfg.fused_backward + cfg.bf16_weights)
    assert lean_levers("8 GB") > lean_levers("12 GB") > lean_levers("24 GB+")


@pytest.mark.parametrize("card_gib, preset", [(3.8, "6 GB"), (5.8, "6 GB"), (7.6, "8 GB"), (10.9, "8 GB"),
                                               (11.7, "12 GB"), (15.7, "12 GB"), (23.6, "24 GB+"), (79.1, "24 GB+")])
def test_auto_picks_the_preset_for_the_cards_memory(card_gib, preset):
    assert preset_for_memory(int(card_gib * GIB)) == preset
    cfg = apply_preset(TrainConfig(**USER), "auto", has_bf16=True, total_memory=int(card_gib * GIB))
    assert cfg.memory_preset == preset


def test_auto_without_a_gpu_and_custom_keep_the_settings_and_unknown_names_are_refused():
    cfg = TrainConfig(**USER)
    assert apply_preset(cfg, "auto", has_bf16=False, total_memory=None) is cfg
    assert apply_preset(cfg, "custom", has_bf16=True, total_memory=8 * GIB) is cfg
    assert apply_preset(cfg, "8gb", has_bf16=True).memory_preset == "8 GB"  # as typed on a command line
    assert apply_preset(cfg, "24GB", has_bf16=True).memory_preset == "24 GB+"
    with pytest.raises(ConfigError, match="memory_preset: '4 GB'.*'8 GB'"):
        apply_preset(cfg, "4 GB", has_bf16=True)


class Log(Callbacks):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def test_train_applies_the_preset_logs_its_levers_and_trains_with_them(images, tmp_path, monkeypatch):
    made = []
    make_optimizer = trainer.loop.make_optimizer
    monkeypatch.setattr(trainer.loop, "make_optimizer", lambda cfg, *a: made.append(make_optimizer(cfg, *a)) or made[-1])
    log = Log()
    cfg = config(images, tmp_path, memory_preset="8 GB", max_train_steps=2, max_grad_norm=0.0)
    result = trainer.loop.train(cfg, bundle=tiny_bundle("sd1"), callbacks=log)
    assert result.steps == 2
    # On the CPU (no bf16 here): the fallback, fused 8-bit AdamW in fp32
    assert isinstance(made[0], FusedBackward) and "8bit" in type(made[0].optimizers[0]).__name__
    line = next(line for line in log.lines if "memory preset" in line)
    assert line.startswith("Training SD 1.x at 32 px;") and "'8 GB' on cpu" in line and "fused backward" in line and "optimizer adamw8bit" in line
    assert "bf16 weights" not in line


def test_a_gpu_has_bf16_only_when_native_not_emulated(monkeypatch):
    # torch.cuda.is_bf16_supported() says yes on a T4 (compute capability 7.5): bf16 emulated, many times slower
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", None)
    cuda = torch.device("cuda", 0)
    for major, expected in ((7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(major=major))
        assert trainer.device.resolve_precision("auto", cuda) == expected
        assert trainer.device.has_native_bf16(cuda) == (expected == torch.bfloat16)
    assert not trainer.device.has_native_bf16(torch.device("cpu"))


@pytest.mark.parametrize("preset, advice", [("custom", "Choose memory_preset '8 GB'"),
                                            ("8 GB", "already the leanest memory preset"),
                                            ("6 GB", "already the leanest memory preset")])
def test_out_of_memory_names_the_preset_to_choose(images, tmp_path, preset, advice):
    bundle = tiny_bundle("sd1")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    bundle.unet.forward = out_of_memory
    with pytest.raises(MemoryError, match=advice) as raised:
        trainer.loop.train(config(images, tmp_path, memory_preset=preset), bundle=bundle)
    message = str(raised.value)
    assert "in the training phase, asking for 20.00 MiB more" in message and "resolution 32, batch size 1" in message
    assert "No training state was saved yet" in message


# --- SDXL: presets of its own, chosen by measurement at 1024 px (tests/test_memory_budget.py holds them) ------------


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("has_bf16", [True, False])
def test_every_sdxl_preset_is_a_valid_configuration(name, has_bf16):
    cfg = apply_preset(TrainConfig(**USER, train_text_encoder=True), name, has_bf16, family="sdxl")
    cfg.validate()
    assert cfg.memory_preset == name and cfg.train_text_encoder and cfg.gradient_checkpointing  # 16 GiB without it
    assert cfg.fused_backward  # the UNet's whole gradients (4.8 GiB in bf16, 9.6 in fp32) never exist


def test_sdxl_fits_12_and_16_gb_with_bf16_weights_and_adafactor_and_24_gb_with_8bit_adamw():
    lean = apply_preset(TrainConfig(**USER), "12 GB", has_bf16=True, family="sdxl")
    assert (lean.optimizer, lean.bf16_weights, lean.mixed_precision) == ("adafactor", True, "bf16")
    smallest = apply_preset(TrainConfig(**USER), "8 GB", has_bf16=True, family="sdxl")
    assert dataclasses.replace(smallest, memory_preset="12 GB") == lean  # there is no leaner one for SDXL
    fast = apply_preset(TrainConfig(**USER), "24 GB+", has_bf16=True, family="sdxl")
    assert (fast.optimizer, fast.bf16_weights, fast.mixed_precision) == ("adamw8bit", False, "bf16")
    # with both text encoders, fp32 weights do not leave room on 24 GB (20.9 GiB, est. 23.0 reserved): bf16 weights
    fast_te = apply_preset(TrainConfig(**USER, train_text_encoder=True), "24 GB+", has_bf16=True, family="sdxl")
    assert (fast_te.optimizer, fast_te.bf16_weights, fast_te.fused_backward) == ("adamw8bit", True, True)
    assert apply_preset(TrainConfig(**USER, train_text_encoder=True), "24 GB+", True, family="sd1").optimizer == "adamw"
    without = apply_preset(TrainConfig(**USER), "12 GB", has_bf16=False, family="sdxl")
    assert (without.optimizer, without.bf16_weights, without.mixed_precision) == ("adafactor", False, "no")


@pytest.mark.parametrize("family", [None, "sd1", "sd2"])
def test_sd1_and_sd2_keep_their_presets(family):
    for name, (with_bf16, without_bf16) in PRESETS.items():
        for has_bf16, levers in ((True, with_bf16), (False, without_bf16)):
            cfg = apply_preset(TrainConfig(**USER), name, has_bf16, family=family)
            assert {key: getattr(cfg, key) for key in levers} == levers
    assert apply_preset(TrainConfig(**USER), "12 GB", True, family="sd1").optimizer == "adamw8bit"


def test_the_run_takes_the_familys_levers_and_says_so():
    from trainer.families import SD1, SDXL
    lines = []
    with trainer.device.emulating_gpu(int(11.6 * GIB)):
        cfg = trainer.device.with_memory_preset(TrainConfig(**USER, memory_preset="auto", resolution=1024),
                                                torch.device("cpu"), lines.append, SDXL)
        assert cfg.memory_preset == "12 GB" and cfg.optimizer == "adafactor" and cfg.bf16_weights
        assert "Training SDXL at 1024 px; memory preset 'auto'" in lines[-1]
        assert "12 GB; precision bf16, optimizer adafactor" in lines[-1]
        cfg = trainer.device.with_memory_preset(TrainConfig(**USER, memory_preset="auto"), torch.device("cpu"),
                                                lines.append, SD1)
        assert cfg.optimizer == "adamw8bit" and "12 GB; precision bf16, optimizer adamw8bit" in lines[-1]
