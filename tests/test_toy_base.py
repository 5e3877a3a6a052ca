"""The shipped toy base model: loads like any SD1 checkpoint and draws what its prompt asks for."""
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import tiny_bundle
from trainer.models import load_model
from trainer.sampling import sample_images
from trainer.toy import world

BASE = Path(world.__file__).with_name("base.safetensors")
NAMES = list(world.PALETTE)
RGB = np.array([world.PALETTE[name] for name in NAMES], dtype=np.float32)

# (prompt, shape colour, background): colour pairs chosen so no single colour serves two cases.
CASES = [("a red star on a blue background", "red", "blue"),
         ("a yellow circle on a black background", "yellow", "black"),
         ("a white square on a green background", "white", "green")]
SEEDS = [0, 1, 2, 3]


def colour_names(image) -> np.ndarray:
    """Each pixel's nearest world colour, as an index into NAMES."""
    pixels = np.asarray(image, dtype=np.float32)
    return np.linalg.norm(pixels[:, :, None, :] - RGB, axis=-1).argmin(-1)


def follows_prompt(image, color: str, background: str) -> bool:
    """The four corners are the background colour, and at least 8% of the central area is the shape's colour."""
    pixels = np.asarray(image, dtype=np.float32)
    corners = [pixels[y:y + 4, x:x + 4].reshape(-1, 3).mean(0) for y in (0, 28) for x in (0, 28)]
    corner_names = [NAMES[int(np.linalg.norm(RGB - corner, axis=-1).argmin())] for corner in corners]
    centre = colour_names(image)[6:26, 6:26]
    return corner_names == [background] * 4 and (centre == NAMES.index(color)).mean() >= 0.08


def passing(bundle, prompt: str, color: str, background: str) -> int:
    images = sample_images(bundle, [prompt] * len(SEEDS), seeds=SEEDS, width=32, height=32, steps=20, guidance=5.0,
                           sampler="ddim", batch_size=len(SEEDS))
    return sum(follows_prompt(image, color, background) for image in images)


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)  # tiny ops: one thread is faster than two contended ones
    return load_model(BASE)


def test_shipped_file_is_small_and_loads_as_an_sd1_checkpoint(base):
    assert BASE.stat().st_size <= 30 * 2**20
    assert base.family == "sd1" and base.prediction_type == "epsilon"
    assert base.vae_scale_factor == 4 and base.unet.config.sample_size == 8
    assert base.text_encoder.config.vocab_size == 49408
    assert base.tokenizer("a sks star").input_ids == [49406, 320, 48136, 1565, 49407]


@pytest.mark.parametrize("prompt, color, background", CASES)
def test_the_base_model_draws_the_colours_it_is_asked_for(base, prompt, color, background):
    assert passing(base, prompt, color, background) >= 3


def test_the_check_has_teeth_a_random_model_fails_it():
    bundle = tiny_bundle("sd1", seed=0)
    assert all(passing(bundle, *case) == 0 for case in CASES)
