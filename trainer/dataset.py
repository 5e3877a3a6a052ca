"""Instance and class images in, training tensors out.

Loading is strict about what it cannot use and lenient about what it can: a file with an image extension that does not
decode is an error naming the file and the fix (nothing is skipped silently, so no photo is lost), while captions,
hidden files and sub-folders are ignored. Every odd-but-valid image (CMYK, 16-bit, palette, transparency, grayscale,
EXIF-rotated) becomes plain upright RGB. The user's files are only ever opened for reading.

`to_training_tensor` reproduces, bit for bit, the torchvision pipeline of diffusers' train_dreambooth.py:
Resize(res, BILINEAR) -> CenterCrop(res) -> ToTensor() -> Normalize([0.5], [0.5]), without depending on torchvision.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Extensions we try to decode. Formats Pillow may not read here (HEIC, camera RAW, PSD) are included on purpose:
# such a photo fails with a clear "re-export it" error instead of being silently left out of the training set.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif",
    ".heic", ".heif", ".dng", ".cr2", ".nef", ".arw", ".raw", ".psd",
})
# Below this a photo carries too little detail to learn a subject from (training upsamples it to 512+ px).
MIN_SIDE = 64
# Refuse, rather than decode, anything larger than Pillow's own decompression-bomb threshold (~89.5 MP, e.g.
# 9459 x 9459): such a file is a bomb or a scan/panorama far beyond the 512-768 px training resolution, and decoding
# it costs 270+ MB per image. Reduced decoding (JPEG draft) is not used because it would change the pixels the
# training sees compared with a full decode; the error asks the user to downscale instead.
MAX_PIXELS = 89_478_485
# Transparent pixels are composited onto white: the usual product-shot background, and neutral for the subject.
BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """An input image, folder or image-count setting that cannot be used; the message says which and how to fix it."""


@dataclass
class SubjectImage:
    name: str  # file name, for messages and the fingerprint
    image: Image.Image  # upright RGB


def load_image_folder(folder, *, min_images: int = 1, max_images: int = 100) -> list[SubjectImage]:
    """All images directly inside `folder`, sorted by file name; other files and sub-folders are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"Image folder {folder} does not exist (or is not a folder). Check the path, or create it "
                         f"and put the photos of your subject in it.")
    paths, skipped = _split_image_files(folder)
    if not min_images <= len(paths) <= max_images:
        raise ImageError(_count_message(folder, len(paths), skipped, min_images, max_images))
    return load_image_files(paths)


def load_image_files(paths) -> list[SubjectImage]:
    """Decode the given files to upright RGB, sorted by file name; any file that cannot be used raises ImageError."""
    ordered = sorted((Path(p) for p in paths), key=lambda p: (p.name, str(p)))
    return [SubjectImage(path.name, _load_rgb(path)) for path in ordered]


def _split_image_files(folder: Path) -> tuple[list[Path], list[str]]:
    """(image files, names of skipped entries). Hidden files are skipped: macOS '._x.jpg' twins are not images."""
    entries = sorted(folder.iterdir())
    images = [entry for entry in entries if _is_image_file(entry)]
    skipped = [entry.name for entry in entries if not _is_image_file(entry)]
    return images, skipped


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _count_message(folder: Path, count: int, skipped: list[str], min_images: int, max_images: int) -> str:
    message = (f"Image folder {folder} holds {count} image(s), but this input takes {min_images} to {max_images}. "
               f"Add or remove images so the count is in range (DreamBooth needs 3-5 photos of one subject).")
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        message += (f" Ignored {len(skipped)} entries that are not images by extension ({shown}); "
                    f"supported: {', '.join(sorted(IMAGE_EXTENSIONS))}.")
    return message


def _load_rgb(path: Path) -> Image.Image:
    if path.stat().st_size == 0:
        raise ImageError(f"{path} is empty (0 bytes). Re-export or re-copy the photo, or remove it from the folder.")
    try:
        with Image.open(path) as image:
            _check_size(path, image.size)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path} is too large to load safely ({error}). Downscale it to at most 4096 px "
                         f"on its long side and retry.") from error
    except (OSError, SyntaxError, ValueError) as error:  # what Pillow raises for corrupt or truncated data
        raise ImageError(f"{path} cannot be read as an image ({type(error).__name__}: {error}). It may be corrupt, "
                         f"truncated or in a format Pillow cannot read here: re-export it as JPEG or PNG, or remove "
                         f"it from the folder.") from error


def _check_size(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageError(f"{path} is {width}x{height} px ({width * height / 1e6:.0f} MP), above the "
                         f"{MAX_PIXELS / 1e6:.0f} MP this loader decodes. Downscale it to at most 4096 px on its "
                         f"long side and retry.")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{path} is only {width}x{height} px; photos need at least {MIN_SIDE} px on the shorter "
                         f"side (512 or more is best). Use a larger version of the photo, or remove it.")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Plain 8-bit RGB: transparency composited onto BACKGROUND, 16/32-bit gray scaled (not clipped) to 8 bits."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit PNG/TIFF gray; convert() would clip at 255
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Output (width, height) of torchvision Resize(size) for a PIL image: shorter side -> size, aspect kept, the
    longer side truncated as in torchvision's _compute_resized_output_size: int(size * long / short)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL crop box of torchvision CenterCrop(size): offsets use Python's round(), i.e. halves round to even."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def to_training_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """[3, resolution, resolution] float32 in [-1, 1], equal to torchvision's Resize(resolution, BILINEAR) ->
    CenterCrop(resolution) -> ToTensor() -> Normalize([0.5], [0.5]) on the same RGB PIL image."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    size = resized_size(*image.size, resolution)
    if size != image.size:  # torchvision returns the image untouched when it already has the size
        image = image.resize(size, Image.Resampling.BILINEAR)
    image = image.crop(center_crop_box(*image.size, resolution))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return pixels.to(torch.float32).div(255).sub(0.5).div(0.5)


def size_conditioning(image: Image.Image, resolution: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """What to_training_tensor does to `image`, as SDXL's micro-conditioning states it, (height, width) pairs: the
    original size, the top-left corner of the crop in the resized image, the target size. Computed as diffusers'
    train_text_to_image_sdxl.py does for the same resize and centre crop."""
    left, top, _, _ = center_crop_box(*resized_size(*image.size, resolution), resolution)
    return (image.height, image.width), (top, left), (resolution, resolution)


def image_fingerprint(images: list[SubjectImage]) -> str:
    """sha256 over names and decoded pixels (with sizes, so no two different sets can hash the same bytes)."""
    digest = hashlib.sha256()
    for item in images:
        rgb = item.image.convert("RGB")
        name = item.name.encode()
        digest.update(len(name).to_bytes(8, "little") + name)
        digest.update(rgb.width.to_bytes(8, "little") + rgb.height.to_bytes(8, "little") + rgb.tobytes())
    return digest.hexdigest()
