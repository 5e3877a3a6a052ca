"""The node-side conversions, without ComfyUI."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nodes.comfy_io import folder_fingerprint, image_batch_to_pil, pil_to_image_batch
from trainer.checkpoint import read_trigger_phrase, save_checkpoint
from tests.tiny import tiny_bundle


def test_image_batches_round_trip_exactly_through_pil():
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.float32) / 255)
    images = image_batch_to_pil(pixels)
    assert [im.size for im in images] == [(7, 5), (7, 5)] and images[0].mode == "RGB"
    assert torch.equal(pil_to_image_batch(images), pixels)


def test_grayscale_and_rgba_batches_become_rgb():
    gray = image_batch_to_pil(torch.full((1, 4, 4, 1), 0.5))[0]
    assert gray.getpixel((0, 0)) == (128, 128, 128)
    rgba = image_batch_to_pil(torch.ones(1, 4, 4, 4))[0]
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="IMAGE batch"):
        image_batch_to_pil(torch.ones(4, 4, 3))


def test_folder_fingerprint_sees_added_and_rewritten_photos(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    first = folder_fingerprint(str(tmp_path))
    assert folder_fingerprint(str(tmp_path)) == first
    Image.new("RGB", (8, 8), "red").save(tmp_path / "b.png")
    second = folder_fingerprint(str(tmp_path))
    assert second != first
    os.utime(tmp_path / "a.png", ns=(1, 1))  # rewritten in place: same name and size, new mtime
    assert folder_fingerprint(str(tmp_path)) != second


def test_trigger_phrase_comes_from_the_header(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(tiny_bundle("sd1"), path, {"modelspec.trigger_phrase": "a zwx dog"})
    assert read_trigger_phrase(str(path)) == "a zwx dog"
    save_checkpoint(tiny_bundle("sd1"), path, {})
    assert read_trigger_phrase(str(path)) == ""
