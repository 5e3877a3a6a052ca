"""The training loop end to end on tiny models: it learns, saves, cancels and resumes exactly."""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from trainer.callbacks import Callbacks, TrainingCancelled
from trainer.config import ConfigError, TrainConfig
from trainer.loop import train
from trainer.state import state_dir_for
from tests.tiny import tiny_bundle



@pytest.fixture(scope="module")
def images(subject_photos):
    return subject_photos(dog=3, cat=3)


def config(images, tmp_path, **overrides) -> TrainConfig:
    settings = dict(base_model="tiny-sd1", instance_dir=str(images / "dog"), class_dir=str(images / "cat"),
                    identifier="zwx", class_noun="dog", output=str(tmp_path / "out" / "zwx-dog.safetensors"),
                    resolution=32, max_train_steps=4, learning_rate=1e-3, num_class_images=3, optimizer="adamw",
                    device="cpu", seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def max_change(before, module) -> float:
    return max((module.state_dict()[k] - v).abs().max().item() for k, v in before.items())


class StopAfter(Callbacks):
    def __init__(self, steps):
        self.steps, self.seen = steps, 0

    def on_step(self, info):
        self.seen = info.step

    def should_stop(self):
        return self.seen >= self.steps


class CrashAt(StopAfter):
    def on_step(self, info):
        super().on_step(info)
        if info.step == self.steps:
            raise RuntimeError("simulated crash")


def test_trains_unet_only_and_writes_a_loadable_checkpoint(images, tmp_path):
    bundle = tiny_bundle("sd1")
    unet0, text0 = weights(bundle.unet), weights(bundle.text_encoder)
    steps = []
    cb = Callbacks()
    cb.on_step = steps.append
    result = train(config(images, tmp_path), bundle=bundle, callbacks=cb)
    assert [s.step for s in steps] == [1, 2, 3, 4] and all(s.prior_loss > 0 for s in steps)
    assert max_change(unet0, bundle.unet) > 1e-4  # the UNet learned
    assert max_change(text0, bundle.text_encoder) == 0.0  # the frozen text encoder did not move
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    with safe_open(result.output, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.trigger_phrase"] == "a zwx dog"
    assert meta["dreambooth.identifier"] == "zwx" and meta["dreambooth.class_noun"] == "dog"
    assert '"prior_loss_weight": 1.0' in meta["dreambooth.train_config"]
    assert not state_dir_for(result.output).exists()  # finished runs leave no multi-GB state behind


def test_text_encoder_trains_when_asked(images, tmp_path):
    bundle = tiny_bundle("sd1")
    text0 = weights(bundle.text_encoder)
    train(config(images, tmp_path, train_text_encoder=True, max_train_steps=2), bundle=bundle)
    assert max_change(text0, bundle.text_encoder) > 1e-4


def test_same_seed_same_weights_other_seed_differs(images, tmp_path):
    runs = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        bundle = tiny_bundle("sd1")
        train(config(images, tmp_path / name, seed=seed, max_train_steps=3), bundle=bundle)
        runs.append(weights(bundle.unet))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("interrupt", [CrashAt, StopAfter])
def test_killed_and_resumed_run_ends_with_the_same_weights(images, tmp_path, interrupt):
    # batch 2 over 3 items: epochs end mid-batch, so the data position must be restored, not just the step.
    settings = dict(max_train_steps=6, checkpoint_every=2, batch_size=2, train_text_encoder=True)
    straight = tiny_bundle("sd1")
    train(config(images, tmp_path / "straight", **settings), bundle=straight)

    cfg = config(images, tmp_path / "resumed", **settings)
    with pytest.raises((RuntimeError, TrainingCancelled)):
        train(cfg, bundle=tiny_bundle("sd1"), callbacks=interrupt(3))
    assert state_dir_for(cfg.output).exists() and not Path(cfg.output).exists()
    resumed = tiny_bundle("sd1")  # a fresh process would load the base model again
    result = train(cfg, bundle=resumed)
    # a crash at step 3 resumes from the state of step 2; a cancel saves step 3 itself
    assert result.resumed_from == (2 if interrupt is CrashAt else 3)
    for name in ("unet", "text_encoder"):
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_state_from_other_settings_is_not_resumed(images, tmp_path):
    cfg = config(images, tmp_path, max_train_steps=4)
    with pytest.raises(TrainingCancelled):
        train(cfg, bundle=tiny_bundle("sd1"), callbacks=StopAfter(2))
    changed = config(images, tmp_path, max_train_steps=4, learning_rate=5e-4)
    logs = []
    cb = Callbacks()
    cb.log = logs.append
    assert train(changed, bundle=tiny_bundle("sd1"), callbacks=cb).resumed_from == 0
    reason = next(line for line in logs if line.startswith("Not resuming"))
    assert "learning_rate 0.001 (now 0.0005)" in reason and "photos" not in reason  # what differs, and only that


def test_v_prediction_sd2_and_bf16_autocast_train(images, tmp_path):
    bundle = tiny_bundle("sd2", "v_prediction")
    unet0 = weights(bundle.unet)
    result = train(config(images, tmp_path, max_train_steps=2, mixed_precision="bf16"), bundle=bundle)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert max_change(unet0, bundle.unet) > 1e-4
    assert all(p.dtype == torch.float32 for p in bundle.unet.parameters())  # master weights stay fp32


def test_the_step_without_autocasts_weight_cache_learns_exactly_the_same(images, tmp_path, monkeypatch):
    import trainer.loop
    runs = {}
    for cached in (False, True):
        if cached:  # the training step's autocast as torch.autocast has it by default
            autocast = trainer.loop._autocast
            monkeypatch.setattr(trainer.loop, "_autocast", lambda device, precision, cache_casts=True:
                                autocast(device, precision))
        bundle = tiny_bundle("sd1")
        train(config(images, tmp_path / str(cached), max_train_steps=3, mixed_precision="bf16",
                     gradient_checkpointing=True, train_text_encoder=True), bundle=bundle)
        runs[cached] = weights(bundle.unet) | {f"te.{k}": v for k, v in weights(bundle.text_encoder).items()}
    assert all(torch.equal(runs[False][k], runs[True][k]) for k in runs[True])


def test_without_prior_preservation_no_class_images_are_used(images, tmp_path):
    seen = []
    cb = Callbacks()
    cb.on_step = seen.append
    train(config(images, tmp_path, with_prior_preservation=False, class_dir="", max_train_steps=2),
          bundle=tiny_bundle("sd1"), callbacks=cb)
    assert all(s.prior_loss == 0.0 for s in seen)


@pytest.mark.parametrize("override, fragment", [
    (dict(output="model.ckpt"), "must end in .safetensors"),
    (dict(identifier=""), "pick-token"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(resolution=100), "multiple of 8"),
    (dict(learning_rate=3.0), "learning_rate"),
])
def test_bad_settings_name_the_setting(images, tmp_path, override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        train(config(images, tmp_path, **override), bundle=tiny_bundle("sd1"))


def test_adamw8bit_trains_and_resumes_exactly(images, tmp_path):
    pytest.importorskip("bitsandbytes")
    settings = dict(max_train_steps=4, checkpoint_every=2, optimizer="adamw8bit")
    straight = tiny_bundle("sd1")
    unet0 = weights(straight.unet)
    train(config(images, tmp_path / "straight", **settings), bundle=straight)
    assert max_change(unet0, straight.unet) > 1e-4

    cfg = config(images, tmp_path / "resumed", **settings)
    with pytest.raises(RuntimeError):
        train(cfg, bundle=tiny_bundle("sd1"), callbacks=CrashAt(3))
    resumed = tiny_bundle("sd1")
    assert train(cfg, bundle=resumed).resumed_from == 2  # its quantized moments came back from safetensors
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_images_passed_in_train_like_the_same_folder(images, tmp_path):
    from trainer.dataset import load_image_folder
    from_folder = tiny_bundle("sd1")
    train(config(images, tmp_path / "a", max_train_steps=2), bundle=from_folder)
    passed = tiny_bundle("sd1")
    train(config(images, tmp_path / "b", max_train_steps=2, instance_dir="", class_dir=""), bundle=passed,
          instance_images=load_image_folder(images / "dog"), class_images=load_image_folder(images / "cat"))
    a, b = from_folder.unet.state_dict(), passed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="3-5 photos"):
        train(config(images, tmp_path / "c", instance_dir=""), bundle=tiny_bundle("sd1"), instance_images=[])


def test_a_diverged_run_stops_with_advice(images, tmp_path):
    bundle = tiny_bundle("sd1")
    with torch.no_grad():
        bundle.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="learning_rate"):
        train(config(images, tmp_path), bundle=bundle)


def test_class_images_are_generated_once_and_reused(images, tmp_path):
    settings = dict(class_dir="", num_class_images=2, prior_steps=2, max_train_steps=1,
                    prior_cache_dir=str(tmp_path / "priors"))
    train(config(images, tmp_path / "a", **settings), bundle=tiny_bundle("sd1"))
    pngs = sorted((tmp_path / "priors").rglob("*.png"))
    assert len(pngs) == 2
    stamps = [p.stat().st_mtime_ns for p in pngs]
    train(config(images, tmp_path / "b", **settings), bundle=tiny_bundle("sd1"))
    assert sorted((tmp_path / "priors").rglob("*.png")) == pngs
    assert [p.stat().st_mtime_ns for p in pngs] == stamps  # the second run generated nothing


def test_a_failed_final_save_keeps_the_run_for_a_rerun(images, tmp_path, monkeypatch):
    import trainer.loop
    cfg = config(images, tmp_path, max_train_steps=3)
    real_save = trainer.loop.save_checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.loop, "save_checkpoint", disk_full)
    trained = tiny_bundle("sd1")
    with pytest.raises(OSError):
        train(cfg, bundle=trained)
    monkeypatch.setattr(trainer.loop, "save_checkpoint", real_save)
    steps = []
    cb = Callbacks()
    cb.on_step = steps.append
    rerun = tiny_bundle("sd1")
    result = train(cfg, bundle=rerun, callbacks=cb)
    assert result.resumed_from == 3 and steps == []  # nothing retrained, only saved
    a, b = trained.unet.state_dict(), rerun.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
