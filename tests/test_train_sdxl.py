"""SDXL in the training loop on a tiny SDXL: the UNet sees what diffusers' SDXL pipeline would give it (both
encoders' states, the pooled embedding, each photo's real size/crop time ids), the loss is the paper's formula, both
text encoders train, and a cancelled run resumes exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from tests.test_train import CrashAt, config, max_change, weights
from tests.tiny import PHOTOS, tiny_bundle
from trainer.api import probe_identifiers
from trainer.config import TrainConfig
from trainer.dataset import SubjectImage
from trainer.loop import for_model, train
from trainer.models import load_model

RESOLUTION = 32


@pytest.fixture(scope="module")
def images(subject_photos):
    return subject_photos(dog=3, cat=3)


def odd_photos() -> list[SubjectImage]:
    """Three dog photos cut to other shapes, so that each one's original size and crop differ."""
    photos = [Image.open(path).convert("RGB") for path in sorted((PHOTOS / "dog").glob("*.jpg"))[:3]]
    boxes = [(0, 0, 256, 192), (40, 0, 200, 256), (0, 0, 256, 256)]  # 256x192, 160x256, 256x256 (w x h)
    return [SubjectImage(f"dog{i}.png", photo.crop(box)) for i, (photo, box) in enumerate(zip(photos, boxes))]


# Resize (shorter side -> 32, the other truncated) then centre-crop (round half to even), worked out by hand:
# 256x192 -> 42x32, left (42-32)/2 = 5; 160x256 -> 32x51, top (51-32)/2 = 9.5 -> 10 (half to even); square -> 0.
EXPECTED_TIME_IDS = {0: [192, 256, 0, 5, 32, 32], 1: [256, 160, 10, 0, 32, 32], 2: [256, 256, 0, 0, 32, 32]}
CLASS_TIME_IDS = [256, 256, 0, 0, 32, 32]  # the class photos are 256 px squares


class Spy:
    """Records what the UNet is called with and returns, and the noise the scheduler adds, for one step."""

    def __init__(self, bundle):
        self.calls, self.noises = [], []
        unet_forward, add_noise = bundle.unet.forward, bundle.noise_scheduler.add_noise

        def forward(sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, **kwargs):
            output = unet_forward(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                  added_cond_kwargs=added_cond_kwargs, **kwargs)
            self.calls.append((encoder_hidden_states.detach(), {k: v.detach() for k, v in added_cond_kwargs.items()},
                               output.sample.detach()))
            return output

        def noising(original, noise, timesteps):
            self.noises.append(noise.detach())
            return add_noise(original, noise, timesteps)

        bundle.unet.forward = forward
        bundle.noise_scheduler.add_noise = noising


def test_the_unet_gets_diffusers_sdxl_conditioning_and_the_loss_is_the_formula(images, tmp_path):
    bundle = tiny_bundle("sdxl", seed=2)
    pipe = StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder,
                                     text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
                                     tokenizer_2=bundle.tokenizer_2, unet=bundle.unet,
                                     scheduler=EulerDiscreteScheduler())
    with torch.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(["a zwx dog", "a dog"], device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False)
    spy = Spy(bundle)
    cfg = config(images, tmp_path, base_model="tiny-sdxl", resolution=RESOLUTION, max_train_steps=3, batch_size=1,
                 prior_loss_weight=0.7)
    result = train(cfg, bundle=bundle, instance_images=odd_photos())

    seen = set()
    for (hidden, added, prediction), noise, loss in zip(spy.calls, spy.noises, result.losses, strict=True):
        assert torch.equal(hidden, states)  # row 0: the instance prompt, row 1: the class prompt
        assert torch.equal(added["text_embeds"], pooled)
        instance_ids, class_ids = added["time_ids"].tolist()
        assert class_ids == CLASS_TIME_IDS
        photo = next(i for i, ids in EXPECTED_TIME_IDS.items() if ids == instance_ids)
        seen.add(photo)
        # The paper's loss: ||eps - eps_hat||^2 on the photo + lambda ||eps' - eps_hat'||^2 on the class image.
        squared = (prediction.float() - noise.float()).pow(2).flatten(1).mean(1)
        assert loss == pytest.approx((squared[0] + 0.7 * squared[1]).item(), rel=1e-5)
    assert seen == {0, 1, 2}  # one epoch: every photo once, each with its own size and crop


def test_both_text_encoders_train_and_a_crashed_run_resumes_exactly(images, tmp_path):
    settings = dict(base_model="tiny-sdxl", resolution=RESOLUTION, max_train_steps=4, checkpoint_every=2,
                    train_text_encoder=True)
    straight = tiny_bundle("sdxl")
    before = [weights(encoder) for encoder in straight.text_encoders]
    train(config(images, tmp_path / "straight", **settings), bundle=straight)
    assert all(max_change(w, encoder) > 1e-4 for w, encoder in zip(before, straight.text_encoders))

    cfg = config(images, tmp_path / "resumed", **settings)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, bundle=tiny_bundle("sdxl"), callbacks=CrashAt(3))
    resumed = tiny_bundle("sdxl")
    result = train(cfg, bundle=resumed)
    assert result.resumed_from == 2
    for name in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name

    loaded = load_model(Path(result.output), dtype=torch.float32)
    assert loaded.family == "sdxl"
    for name in ("unet", "text_encoder_2"):  # saved as fp16: compare at that precision
        a, b = getattr(resumed, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(a[k].half().float(), b[k]) for k in a if a[k].is_floating_point()), name


def test_sdxl_trains_at_1024_unless_told_otherwise():
    from bench.models import PREDICTION_TYPES
    from trainer.models import build_bundle, shipped_configs

    def full_size(family):  # shapes only: the size comes from the configs
        configs = shipped_configs(family)
        with torch.device("meta"):
            return build_bundle(family, PREDICTION_TYPES[family], configs.unet, configs.vae, configs.text,
                                text_config_2=configs.text_2)
    assert [for_model(TrainConfig(), full_size(f)).resolution for f in ("sd1", "sd2", "sdxl")] == [512, 768, 1024]
    assert for_model(TrainConfig(resolution=768), full_size("sdxl")).resolution == 768
    assert for_model(TrainConfig(), tiny_bundle("sdxl")).resolution == 16  # the tiny test model's own size


def test_identifiers_are_probed_on_sdxl_and_are_one_token_in_both_tokenizers():
    bundle = tiny_bundle("sdxl")
    ranked = probe_identifiers(bundle, "dog", candidates=12, shortlist=4, seed=0, device=torch.device("cpu"))
    assert len(ranked) == 4 and all(token.strength >= 0 for token in ranked)
    for token in ranked:
        for tokenizer in bundle.tokenizers:
            assert tokenizer(token.identifier, add_special_tokens=False).input_ids == list(token.token_ids)


def test_a_zero_terminal_snr_v_prediction_model_trains_as_one_and_says_so_in_its_file(images, tmp_path):
    from safetensors import safe_open

    from trainer.checkpoint import save_checkpoint
    base = tmp_path / "xl-base.safetensors"
    save_checkpoint(tiny_bundle("sdxl"), base, {}, dtype=torch.float32)  # an epsilon file, told otherwise below
    cfg = config(images, tmp_path, base_model=str(base), resolution=RESOLUTION, max_train_steps=1,
                 prediction_type="v_prediction", noise_schedule="zero_terminal_snr")
    result = train(cfg)
    with safe_open(result.output, "pt") as file:
        assert {"v_pred", "ztsnr"} <= set(file.keys())  # ComfyUI samples it as v-prediction with zero terminal SNR
    assert (load_model(result.output).prediction_type, load_model(result.output).zero_terminal_snr) == \
        ("v_prediction", True)
