"""SDXL's conditioning as diffusers' StableDiffusionXLPipeline makes it (its encode_prompt and time ids), on a tiny
SDXL; SD1/SD2's as the text encoder's last hidden states."""
from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from tests.tiny import tiny_bundle
from trainer.conditioning import Conditioning, encode_prompts, time_ids, tokenize

PROMPTS = ["a photo of zwx dog", "a photo of dog"]


def xl_pipeline(bundle) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder,
                                     text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
                                     tokenizer_2=bundle.tokenizer_2, unet=bundle.unet,
                                     scheduler=EulerDiscreteScheduler())


@torch.no_grad()
def test_sdxl_prompt_encoding_matches_diffusers_encode_prompt():
    bundle = tiny_bundle("sdxl", seed=3)
    ours = encode_prompts(bundle, PROMPTS)
    states, _, pooled, _ = xl_pipeline(bundle).encode_prompt(PROMPTS, device=torch.device("cpu"),
                                                              do_classifier_free_guidance=False)
    assert ours.states.shape == (2, 77, 32 + 48)  # CLIP-L's width then bigG's, side by side
    assert torch.equal(ours.states, states)
    assert torch.equal(ours.pooled, pooled)
    assert not torch.equal(ours.states[0], ours.states[1])  # the identifier changes the conditioning


@torch.no_grad()
def test_sdxl_uses_each_tokenizer_with_its_own_padding():
    ids, ids_2 = tokenize(tiny_bundle("sdxl"), ["a dog"])
    assert ids[0, :5].tolist() == [49406, 320, 1929, 49407, 49407]  # CLIP-L pads with <|endoftext|>
    assert ids_2[0, :5].tolist() == [49406, 320, 1929, 49407, 0]  # bigG with "!"


@pytest.mark.parametrize("original, crop, target", [((512, 768), (0, 128), (512, 512)), ((1024, 1024), (0, 0),
                                                                                         (1024, 1024))])
def test_time_ids_match_diffusers(original, crop, target):
    bundle = tiny_bundle("sdxl")
    theirs = xl_pipeline(bundle)._get_add_time_ids(original, crop, target, dtype=torch.float32,
                                                   text_encoder_projection_dim=48)
    assert torch.equal(time_ids(original, crop, target)[None], theirs)


@torch.no_grad()
def test_sdxl_unet_output_depends_on_the_pooled_text_and_the_time_ids():
    bundle = tiny_bundle("sdxl", seed=1)
    cond = encode_prompts(bundle, PROMPTS[:1])
    latents, timestep = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ids = time_ids((256, 256), (0, 0), (256, 256))[None]
    base = bundle.unet(latents, timestep, **cond.unet_kwargs(ids)).sample
    cropped = bundle.unet(latents, timestep, **cond.unet_kwargs(time_ids((256, 384), (0, 64), (256, 256))[None]))
    other_pooled = Conditioning(cond.states, cond.pooled + 1).unet_kwargs(ids)
    assert not torch.allclose(base, cropped.sample)
    assert not torch.allclose(base, bundle.unet(latents, timestep, **other_pooled).sample)
    with pytest.raises(ValueError, match="time ids"):
        cond.unet_kwargs()


@torch.no_grad()
def test_sd_conditioning_is_the_last_hidden_state():
    bundle = tiny_bundle("sd2")
    ours = encode_prompts(bundle, PROMPTS)
    ids = tokenize(bundle, PROMPTS)[0]
    assert ours.pooled is None and torch.equal(ours.states, bundle.text_encoder(ids).last_hidden_state)
    assert ours.unet_kwargs().keys() == {"encoder_hidden_states"}
