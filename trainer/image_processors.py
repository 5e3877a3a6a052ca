"""Transformers' CLIP, Bit (DINOv2) and ViT image processors reproduced from their preprocessor_config.json, with
PIL and numpy only (transformers' own need torchvision in their default form, and their two forms differ slightly):
the embedders (embedders.py) feed each model exactly as its own processor does."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BICUBIC, BILINEAR = 3, 2  # PIL's resample codes, as transformers' configs write them


@dataclass(frozen=True)
class Preprocess:
    """What transformers' CLIP, Bit (DINOv2) and ViT image processors do, as their preprocessor_config.json sets it:
    resize (the shorter side to `shortest_edge`, or to exactly `height` x `width`), centre crop, scale to 0..1,
    normalise with the model's mean and std."""
    shortest_edge: int | None  # resize the shorter side to this, keeping the aspect ratio...
    resize_to: tuple[int, int] | None  # ...or to exactly (height, width)
    crop: tuple[int, int] | None  # centre crop (height, width), or None
    resample: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale: float = 1 / 255

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images of any size -> pixel values [N, 3, H, W], float32."""
        return torch.from_numpy(np.stack([self.one(image) for image in images]))

    def one(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        if self.shortest_edge:
            width, height = image.size
            short, long = sorted((width, height))
            if short != self.shortest_edge:
                scaled = int(self.shortest_edge * long / short)  # truncated, as transformers does
                size = (self.shortest_edge, scaled) if width <= height else (scaled, self.shortest_edge)
                image = image.resize(size, self.resample)
        elif self.resize_to and image.size != self.resize_to[::-1]:
            image = image.resize(self.resize_to[::-1], self.resample)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
        if self.crop:
            pixels = center_crop(pixels, *self.crop)
        pixels = pixels * np.float32(self.rescale)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return (pixels - mean) / std

    @classmethod
    def from_config(cls, config: dict) -> "Preprocess":
        """From a preprocessor_config.json (CLIPImageProcessor, BitImageProcessor, ViTImageProcessor or their older
        *FeatureExtractor names), with each processor's own defaults for what the file leaves out."""
        kind = config.get("image_processor_type") or config.get("feature_extractor_type") or "CLIPImageProcessor"
        base = next((preset for name, preset in PROCESSOR_DEFAULTS.items() if kind.startswith(name)), None)
        if base is None:
            raise ValueError(f"image processor {kind!r} is not one this pack reproduces (CLIP, Bit, ViT)")
        square = kind.startswith("ViT")  # a bare number means a square for ViT's processor, the shorter side else
        shortest, resize_to = base.shortest_edge, base.resize_to
        if config.get("do_resize", True) is False:
            shortest, resize_to = None, None
        elif "size" in config:
            size = config["size"]
            if isinstance(size, int):
                shortest, resize_to = (None, (size, size)) if square else (size, None)
            elif "shortest_edge" in size:
                shortest, resize_to = size["shortest_edge"], None
            else:
                shortest, resize_to = None, (size["height"], size["width"])
        crop = base.crop
        if "crop_size" in config:
            crop_size = config["crop_size"]
            crop = (crop_size, crop_size) if isinstance(crop_size, int) else (crop_size["height"], crop_size["width"])
        if not config.get("do_center_crop", base.crop is not None):
            crop = None
        mean, std = tuple(config.get("image_mean", base.mean)), tuple(config.get("image_std", base.std))
        if config.get("do_normalize", True) is False:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        rescale = config.get("rescale_factor", base.rescale) if config.get("do_rescale", True) else 1.0
        return cls(shortest, resize_to, crop, config.get("resample", base.resample), mean, std, rescale)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] -> the centred [C, height, width] (as transformers crops: the odd pixel goes to the bottom/right)."""
    top, left = (pixels.shape[1] - height) // 2, (pixels.shape[2] - width) // 2
    if top < 0 or left < 0:
        raise ValueError(f"an image of {pixels.shape[2]}x{pixels.shape[1]} is smaller than the model's crop "
                            f"{width}x{height} after resizing")
    return pixels[:, top:top + height, left:left + width]


PROCESSOR_DEFAULTS = {  # transformers' defaults for each image processor
    "CLIPImageProcessor": Preprocess(224, None, (224, 224), BICUBIC, OPENAI_MEAN, OPENAI_STD),
    "CLIPFeatureExtractor": Preprocess(224, None, (224, 224), BICUBIC, OPENAI_MEAN, OPENAI_STD),
    "BitImageProcessor": Preprocess(224, None, (224, 224), BICUBIC, OPENAI_MEAN, OPENAI_STD),
    "ViTImageProcessor": Preprocess(None, (224, 224), None, BILINEAR, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "ViTFeatureExtractor": Preprocess(None, (224, 224), None, BILINEAR, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# A single file has no preprocessor_config.json: each family's published one (CLIP's at the model's image size).
DEFAULT_PREPROCESS = {
    "clip": PROCESSOR_DEFAULTS["CLIPImageProcessor"],
    "dinov2": Preprocess(256, None, (224, 224), BICUBIC, IMAGENET_MEAN, IMAGENET_STD),  # facebook/dinov2-*
    "vit": Preprocess(None, (224, 224), None, BILINEAR, IMAGENET_MEAN, IMAGENET_STD),  # facebook/dino-vit*
}
