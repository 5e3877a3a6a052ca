"""Conversions between ComfyUI's data and the engine's, with no ComfyUI import (tested without ComfyUI)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_batch_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE [B, H, W, C] floats in 0..1 -> RGB PIL images."""
    if images.ndim != 4:
        raise ValueError(f"expected an IMAGE batch [B, H, W, C], got shape {tuple(images.shape)}")
    array = (images.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    out = []
    for frame in array:
        if frame.shape[-1] == 1:
            frame = np.repeat(frame, 3, axis=-1)
        out.append(Image.fromarray(frame[..., :3], "RGB"))
    return out


def pil_to_image_batch(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> ComfyUI IMAGE [B, H, W, 3] floats in 0..1."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays))


def folder_fingerprint(folder: str) -> str:
    """Changes when a file in the folder is added, removed, renamed or rewritten (for ComfyUI's cache)."""
    if not folder or not os.path.isdir(folder):
        return f"missing:{folder}"
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
