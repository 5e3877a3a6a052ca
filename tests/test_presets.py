import pytest

from trainer.config import ConfigError, TrainConfig
from trainer.presets import apply_preset


def test_presets_choose_levers_and_custom_keeps_settings():
    cfg = TrainConfig(identifier="zwx", class_noun="dog", train_text_encoder=True, optimizer="adamw")
    small = apply_preset(cfg, "8 GB")
    assert small.gradient_checkpointing and small.optimizer == "adamw8bit" and not small.train_text_encoder
    assert apply_preset(cfg, "12 GB").train_text_encoder  # the 12 GB preset keeps the user's choice
    assert not apply_preset(cfg, "24 GB+").gradient_checkpointing
    assert apply_preset(cfg, "custom") is cfg
    assert small.instance_prompt == "a zwx dog"  # everything else carries over


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="4 GB"):
        apply_preset(TrainConfig(), "4 GB")
