from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import tiny_bundle
from trainer.sampling import SAMPLERS, image_grid, make_scheduler, sample_images, size_multiple

FAST = {"steps": 2, "width": 16, "height": 16}
PROMPTS = ["a dog", "a dog", "a red car"]
SEEDS = [1, 2, 1]


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle("sd1")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_close(images_a, images_b):
    """Equal up to one uint8 step: batched float math may round the last bit differently."""
    for a, b in zip(images_a, images_b, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_one_rgb_image_per_prompt_at_the_requested_size(bundle):
    seen = []
    images = sample_images(bundle, PROMPTS, seeds=SEEDS, steps=2, width=16, height=24, batch_size=2,
                           on_image=lambda index, image: seen.append((index, image)))
    assert [image.size for image in images] == [(16, 24)] * 3
    assert all(image.mode == "RGB" for image in images)
    assert [index for index, _ in seen] == [0, 1, 2]
    assert [image for _, image in seen] == images


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_image_depends_on_its_prompt_and_seed_not_its_batch(bundle, sampler):
    batched = sample_images(bundle, PROMPTS, seeds=SEEDS, sampler=sampler, batch_size=3, **FAST)
    single = sample_images(bundle, PROMPTS, seeds=SEEDS, sampler=sampler, batch_size=1, **FAST)
    alone = sample_images(bundle, PROMPTS[2:], seeds=SEEDS[2:], sampler=sampler, **FAST)
    assert_close(batched, single)
    assert_close(batched[2:], alone)
    # Same batches again: bit-identical.
    again = sample_images(bundle, PROMPTS, seeds=SEEDS, sampler=sampler, batch_size=3, **FAST)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(batched, again))
    # Not vacuous: the seed and the prompt both change the picture.
    assert not np.array_equal(pixels(batched[0]), pixels(batched[1]))
    assert not np.array_equal(pixels(batched[0]), pixels(batched[2]))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_scheduler_keeps_the_bundle_training_schedule(sampler):
    v_bundle = tiny_bundle("sd2", "v_prediction")
    scheduler = make_scheduler(v_bundle, sampler)
    assert scheduler.config.prediction_type == "v_prediction"
    for name in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
        assert scheduler.config[name] == v_bundle.noise_scheduler.config[name]


def test_v_prediction_bundle_samples_as_v_prediction():
    # Same weights (same seed), only the prediction type differs: the sampler must read it from the bundle.
    eps = sample_images(tiny_bundle("sd2", "epsilon"), ["a cat"], seeds=[3], sampler="euler", **FAST)
    v = sample_images(tiny_bundle("sd2", "v_prediction"), ["a cat"], seeds=[3], sampler="euler", **FAST)
    assert not np.array_equal(pixels(eps[0]), pixels(v[0]))


def test_allowed_sizes_follow_vae_and_unet_downsampling(bundle):
    assert size_multiple(bundle) == 8  # tiny: 2x VAE, one 2x UNet level; the pipeline itself needs 8
    sd_shaped = SimpleNamespace(unet=SimpleNamespace(num_upsamplers=3), vae_scale_factor=8)
    assert size_multiple(sd_shaped) == 64
    with pytest.raises(ValueError, match=r"width must be a positive multiple of 8.*nearest allowed: 16"):
        sample_images(bundle, ["a"], seeds=[0], steps=2, width=15, height=16)
    with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
        sample_images(bundle, ["a"], seeds=[0], steps=2, width=16, height=0)


@pytest.mark.parametrize("bad, message", [
    ({"sampler": "plms"}, "Unknown sampler 'plms'"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"seeds": [0, 1]}, "one seed per prompt"),
])
def test_rejects_bad_arguments(bundle, bad, message):
    kwargs = {"seeds": [0], **FAST, **bad}
    with pytest.raises(ValueError, match=message):
        sample_images(bundle, ["a dog"], **kwargs)


def test_restores_train_eval_state_and_device(bundle):
    bundle.unet.train()
    bundle.text_encoder.eval()
    bundle.vae.train()
    bundle.vae.decoder.eval()  # a mixed module: every submodule's own flag must come back
    before = {name: m.training for part in ("unet", "vae", "text_encoder")
              for name, m in getattr(bundle, part).named_modules(prefix=part)}
    during = []
    sample_images(bundle, ["a dog"], seeds=[0], device="cpu", **FAST,
                  on_image=lambda *_: during.append([m.training for m in bundle.unet.modules()]))
    after = {name: m.training for part in ("unet", "vae", "text_encoder")
             for name, m in getattr(bundle, part).named_modules(prefix=part)}
    assert during == [[False] * len(during[0])]
    assert after == before
    bundle.unet.eval()
    bundle.vae.eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_samples_on_another_device_and_moves_modules_back():
    cpu_bundle = tiny_bundle("sd1")
    on_cpu = sample_images(cpu_bundle, PROMPTS, seeds=SEEDS, sampler="euler_a", **FAST)
    on_gpu = sample_images(cpu_bundle, PROMPTS, seeds=SEEDS, sampler="euler_a", device="cuda", **FAST)
    for module in (cpu_bundle.unet, cpu_bundle.vae, cpu_bundle.text_encoder):
        assert next(module.parameters()).device.type == "cpu"
    # CPU noise on every device: the same seeds give the same pictures, up to GPU float differences.
    for a, b in zip(on_cpu, on_gpu):
        assert np.abs(pixels(a) - pixels(b)).mean() < 2


def test_image_grid_lays_out_rows():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    tiles = [Image.new("RGB", (4, 6), colour) for colour in colours]
    grid = image_grid(tiles, cols=2)
    assert grid.size == (8, 12)
    assert grid.getpixel((5, 0)) == colours[1]
    assert grid.getpixel((0, 7)) == colours[2]
    assert grid.getpixel((5, 7)) == (0, 0, 0)


# --- SDXL -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xl():
    return tiny_bundle("sdxl")


def diffusers_xl_images(bundle, prompt: str, seed: int, **settings) -> list[Image.Image]:
    """What diffusers' own StableDiffusionXLPipeline draws from the same modules (fp32, its own decode)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, text_encoder_2=bundle.text_encoder_2,
        tokenizer=bundle.tokenizer, tokenizer_2=bundle.tokenizer_2, unet=bundle.unet, add_watermarker=False,
        scheduler=EulerDiscreteScheduler.from_config(bundle.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompt, negative_prompt="", generator=torch.Generator("cpu").manual_seed(seed),
                **settings).images


def test_sdxl_samples_what_diffusers_sdxl_pipeline_draws(xl):
    settings = {"num_inference_steps": 3, "guidance_scale": 5.0, "width": 32, "height": 16}
    ours = sample_images(xl, ["a dog", "a red car"], seeds=[4, 5], sampler="euler", steps=3, guidance=5.0, width=32,
                         height=16, batch_size=1)  # one prompt per call, as below: the same float math, bit for bit
    theirs = diffusers_xl_images(xl, "a dog", 4, **settings) + diffusers_xl_images(xl, "a red car", 5, **settings)
    assert [image.size for image in ours] == [(32, 16)] * 2
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(ours, theirs, strict=True))
    assert not np.array_equal(pixels(ours[0]), pixels(ours[1]))  # not vacuous


def test_sdxl_conditions_on_the_image_size_uncropped(xl, monkeypatch):
    """Size conditioning says: made at this size, not cropped (original = target = the image size, crop 0, 0)."""
    seen = []
    real = type(xl.unet).forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
        seen.append((encoder_hidden_states.shape[-1], added_cond_kwargs["text_embeds"].shape[-1],
                     added_cond_kwargs["time_ids"].tolist()))
        return real(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(type(xl.unet), "forward", spy)
    sample_images(xl, ["a dog"], seeds=[0], steps=1, width=32, height=16)
    width = xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size  # both encoders, side by side
    pooled = xl.text_encoder_2.config.projection_dim
    assert seen == [(width, pooled, [[16.0, 32.0, 0.0, 0.0, 16.0, 32.0]] * 2)]  # negative and positive rows


def test_sdxl_vae_decodes_in_fp32_while_the_rest_draws_in_half_precision(xl):
    decoder_calls, unet_dtypes = [], []
    hooks = [
        xl.vae.decoder.register_forward_pre_hook(lambda module, args: decoder_calls.append(
            (args[0].dtype, module.conv_in.weight.dtype, torch.is_autocast_enabled("cpu"), args[0].shape[0]))),
        xl.unet.register_forward_pre_hook(lambda module, args: unet_dtypes.append(module.conv_in.weight.dtype)),
    ]
    try:
        images = sample_images(xl, ["a dog", "a cat"], seeds=[0, 1], steps=2, width=16, height=16,
                               dtype=torch.bfloat16, autocast=torch.bfloat16)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(unet_dtypes) == {torch.bfloat16}
    assert decoder_calls == [(torch.float32, torch.float32, False, 1)] * 2  # fp32, no autocast, one image at a time
    assert all(np.isfinite(pixels(image)).all() for image in images)
    assert all(p.dtype == torch.float32 for module in xl.modules for p in module.parameters())  # given back


def test_sd1_vae_decodes_as_the_rest_draws(bundle):
    calls = []
    hook = bundle.vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(module.conv_in.weight.dtype))
    try:
        sample_images(bundle, ["a dog"], seeds=[0], dtype=torch.bfloat16, **FAST)
    finally:
        hook.remove()
    assert calls == [torch.bfloat16]


def test_sdxl_restores_every_module_including_the_second_text_encoder(xl):
    xl.text_encoder_2.train()
    before = [p.data_ptr() for module in xl.modules for p in module.parameters()]
    during = []
    sample_images(xl, ["a dog"], seeds=[0], steps=1, width=16, height=16, dtype=torch.bfloat16,
                  on_image=lambda *_: during.append((xl.text_encoder_2.training,
                                                     next(xl.text_encoder_2.parameters()).dtype)))
    assert during == [(False, torch.bfloat16)]  # borrowed in the sampling dtype, in eval mode
    assert xl.text_encoder_2.training
    assert [p.data_ptr() for module in xl.modules for p in module.parameters()] == before
    xl.text_encoder_2.eval()


def test_sdxl_needs_sizes_its_unet_can_halve_twice(xl):
    assert size_multiple(xl) == 8  # tiny: 2x VAE, two 2x UNet levels; the pipeline needs 8
    with pytest.raises(ValueError, match="width must be a positive multiple of 8"):
        sample_images(xl, ["a"], seeds=[0], steps=1, width=12, height=16)
