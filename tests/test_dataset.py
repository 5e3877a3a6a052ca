import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import dataset
from trainer.dataset import (ImageError, SubjectImage, center_crop_box, image_fingerprint, load_image_files,
                             load_image_folder, resized_size, to_training_tensor)
from tests.tiny import PHOTOS

DOG = PHOTOS / "dog"


def save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def load_one(path: Path) -> Image.Image:
    (item,) = load_image_files([path])
    assert item.name == path.name and item.image.mode == "RGB"
    return item.image


# --- odd but valid images become plain RGB --------------------------------------------------------------------------

def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (80, 64), (0, 255, 255, 0))  # pure red in CMYK
    red = load_one(save(cmyk, tmp_path / "cmyk.jpg", quality=100))
    r, g, b = red.getpixel((40, 32))
    assert r > 240 and g < 15 and b < 15


def test_16_bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16).repeat(64, axis=0).repeat(32, axis=1)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_one(path))
    assert rgb.shape == (64, 96, 3)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 40].tolist() == [128] * 3 and rgb[0, 90].tolist() == [255] * 3


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_png(tmp_path, transparent):
    image = Image.new("P", (64, 64), 0)
    image.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 32, 64))  # left half index 1 (red), right half index 0
    params = {"transparency": 0} if transparent else {}
    rgb = load_one(save(image, tmp_path / "palette.png", **params))
    assert rgb.getpixel((10, 10)) == (200, 0, 0)
    assert rgb.getpixel((50, 10)) == ((255, 255, 255) if transparent else (10, 20, 30))


def test_rgba_composited_onto_white(tmp_path):
    image = Image.new("RGBA", (64, 64), (0, 0, 255, 0))  # fully transparent blue
    image.paste((0, 0, 255, 255), (0, 0, 16, 64))  # opaque blue strip
    image.paste((0, 0, 0, 128), (16, 0, 32, 64))  # half-transparent black strip
    rgb = load_one(save(image, tmp_path / "rgba.png"))
    assert rgb.getpixel((5, 5)) == (0, 0, 255)
    assert rgb.getpixel((20, 5)) == (127, 127, 127)
    assert rgb.getpixel((50, 5)) == (255, 255, 255)  # not the hidden blue, which a plain convert("RGB") keeps


def test_gray_with_alpha_composited(tmp_path):
    image = Image.new("LA", (64, 64), (0, 0))
    rgb = load_one(save(image, tmp_path / "la.png"))
    assert rgb.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("mode, value, expected", [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255))])
def test_grayscale_and_bilevel(tmp_path, mode, value, expected):
    rgb = load_one(save(Image.new(mode, (64, 70), value), tmp_path / f"gray_{mode}.png"))
    assert rgb.size == (64, 70) and rgb.getpixel((3, 3)) == expected


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (120, 80), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 40, 40))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright = load_one(save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95))
    assert upright.size == (80, 120)
    top_right, top_left = upright.getpixel((70, 10)), upright.getpixel((10, 10))
    assert top_right[0] > 200 and top_right[1] < 50  # the red block turned to the top-right corner
    assert max(top_left) < 50


# --- bad files: a clear error naming the file and the fix -------------------------------------------------------------

def good_jpeg(path: Path, size=(96, 96)) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return save(Image.fromarray(noise), path, quality=90)


@pytest.mark.parametrize("name, content, expected", [
    ("empty.jpg", b"", r"empty \(0 bytes\)"),
    ("notes.jpg", b"these are my captions, not a photo\n", "cannot be read as an image"),
    ("garbage.png", bytes(range(256)) * 8, "cannot be read as an image"),
])
def test_unreadable_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=expected) as error:
        load_image_files([path])
    assert str(path) in str(error.value)
    assert "remove it" in str(error.value)


def test_truncated_jpeg(tmp_path):
    data = good_jpeg(tmp_path / "full.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="re-export it as JPEG or PNG") as error:
        load_image_files([cut])
    assert str(cut) in str(error.value) and "truncated" in str(error.value)


def test_tiny_image_names_file_and_size(tmp_path):
    path = save(Image.new("RGB", (32, 100)), tmp_path / "thumb.png")
    with pytest.raises(ImageError, match=r"thumb\.png is only 32x100 px.*at least 64 px"):
        load_image_files([path])


def test_oversized_image_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "MAX_PIXELS", 150 * 150)
    path = save(Image.new("RGB", (200, 160)), tmp_path / "scan.png")
    with pytest.raises(ImageError, match=r"scan\.png is 200x160 px .*Downscale it"):
        load_image_files([path])


def test_pillow_decompression_bomb_becomes_image_error(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses images over twice this at open()
    with pytest.raises(ImageError, match=r"bomb\.png is too large to load safely"):
        load_image_files([path])


# --- folders ---------------------------------------------------------------------------------------------------------

def test_folder_skips_non_images_and_sorts(tmp_path):
    for name in ("b.jpg", "a.PNG", "c.webp"):
        save(Image.new("RGB", (64, 64), (1, 2, 3)), tmp_path / name)
    (tmp_path / "a.txt").write_text("a photo of sks dog")
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "._b.jpg").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork, not a JPEG
    (tmp_path / "sub").mkdir()
    save(Image.new("RGB", (64, 64)), tmp_path / "sub" / "nested.jpg")
    images = load_image_folder(tmp_path, min_images=3, max_images=3)
    assert [item.name for item in images] == ["a.PNG", "b.jpg", "c.webp"]


def test_folder_with_no_images(tmp_path):
    (tmp_path / "caption.txt").write_text("sks dog")
    with pytest.raises(ImageError, match=r"holds 0 image\(s\), but this input takes 3 to 5") as error:
        load_image_folder(tmp_path, min_images=3, max_images=5)
    assert str(tmp_path) in str(error.value) and "caption.txt" in str(error.value)


def test_folder_with_too_many_images(tmp_path):
    for index in range(101):
        save(Image.new("L", (64, 64), index), tmp_path / f"{index:03d}.png")
    with pytest.raises(ImageError, match=r"holds 101 image\(s\), but this input takes 1 to 100"):
        load_image_folder(tmp_path)
    assert len(load_image_folder(tmp_path, max_images=101)) == 101


def test_missing_folder(tmp_path):
    with pytest.raises(ImageError, match=r"missing does not exist"):
        load_image_folder(tmp_path / "missing")


def test_bad_file_in_folder_is_an_error_not_a_skip(tmp_path):
    good_jpeg(tmp_path / "0.jpg")
    (tmp_path / "1.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"1\.jpg is empty"):
        load_image_folder(tmp_path)


def test_user_files_are_left_untouched(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    save(Image.new("RGBA", (70, 64), (9, 9, 9, 9)), tmp_path / "a.png")
    save(Image.new("RGB", (64, 80)), tmp_path / "b.jpg", exif=exif)
    before = {path.name: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
              for path in tmp_path.iterdir()}
    load_image_folder(tmp_path)
    after = {path.name: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
             for path in tmp_path.iterdir()}
    assert after == before


def test_real_photos_smoke():
    images = load_image_folder(DOG, min_images=3, max_images=5)
    assert [item.name for item in images] == sorted(path.name for path in DOG.glob("*.jpg"))
    assert all(item.image.mode == "RGB" and item.image.size == (256, 256) for item in images)  # as stored
    batch = torch.stack([to_training_tensor(item.image, 64) for item in images])
    assert batch.shape == (len(images), 3, 64, 64) and batch.dtype == torch.float32
    assert image_fingerprint(images) == image_fingerprint(load_image_folder(DOG))


# --- training tensors: torchvision's Resize -> CenterCrop -> ToTensor -> Normalize ----------------------------------

def reference_tensor(image: Image.Image, resolution: int) -> np.ndarray:
    """The same steps written independently with integer arithmetic and numpy (numpy rounds halves to even, as
    Python's round() in torchvision's CenterCrop does)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    scaled_long = resolution * long // short
    size = (resolution, scaled_long) if width <= height else (scaled_long, resolution)
    pixels = np.asarray(image if size == image.size else image.resize(size, Image.BILINEAR))
    top = int(np.round((size[1] - resolution) / 2))
    left = int(np.round((size[0] - resolution) / 2))
    crop = pixels[top:top + resolution, left:left + resolution].transpose(2, 0, 1).astype(np.float32)
    return (crop / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


@pytest.mark.parametrize("size, resolution", [
    ((300, 201), 64), ((201, 300), 64), ((93, 150), 64), ((640, 480), 96), ((64, 64), 64), ((97, 130), 128),
    ((512, 512), 64),
])
def test_training_tensor_matches_reference(size, resolution):
    pixels = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    tensor = to_training_tensor(image, resolution)
    assert tensor.shape == (3, resolution, resolution) and tensor.dtype == torch.float32
    assert -1 <= tensor.min() and tensor.max() <= 1
    assert np.array_equal(tensor.numpy(), reference_tensor(image, resolution))


def test_resize_and_crop_rounding_pinned():
    assert resized_size(300, 201, 64) == (95, 64)  # 64 * 300 / 201 = 95.52 -> truncated, not rounded
    assert resized_size(201, 300, 64) == (64, 95)
    assert center_crop_box(95, 64, 64) == (16, 0, 80, 64)  # (95 - 64) / 2 = 15.5 -> 16 (half to even)
    assert center_crop_box(64, 93, 64) == (0, 14, 64, 78)  # 14.5 -> 14 (half to even)


def test_fingerprint_tracks_pixels_and_names():
    base = Image.new("RGB", (64, 64), (5, 5, 5))
    changed = base.copy()
    changed.putpixel((63, 63), (5, 5, 6))
    reference = image_fingerprint([SubjectImage("a.jpg", base)])
    assert reference == image_fingerprint([SubjectImage("a.jpg", base.copy())])
    assert reference != image_fingerprint([SubjectImage("a.jpg", changed)])
    assert reference != image_fingerprint([SubjectImage("b.jpg", base)])
    assert len(reference) == 64
