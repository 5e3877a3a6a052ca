"""Conversions between ComfyUI's data and the engine's, with no ComfyUI import (tested without ComfyUI)."""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ..trainer.hosts import in_host_words


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


# --- errors as a node user reads them -----------------------------------------------------------------------------

NODE_COMMANDS = {"pick-token": "the Pick Rare Token node"}
_PACK = __name__.removesuffix("nodes.comfy_io")  # "<pack folder>." inside ComfyUI and in the tests


def node_message(message: str, renames: dict[str, str]) -> str:
    """`message` in a node's words: each engine setting named as the node input in `renames`, and
    `python -m trainer pick-token` as the node that does the same."""
    return in_host_words(message, renames, NODE_COMMANDS)


@contextmanager
def plain_errors(renames: dict[str, str]) -> Iterator[None]:
    """Re-raise the engine's errors as the builtin they are (ValueError, MemoryError...), in the node's words.

    ComfyUI shows an exception's type by its module path, which for the pack's own classes reads like
    'comfyui-dreambooth-studio.trainer.dataset.ImageError'. Builtin errors keep their type and get the node's words;
    anything else (torch's out-of-memory, ComfyUI's interrupt, the engine's TrainingCancelled) passes untouched, for
    ComfyUI or the node to handle."""
    try:
        yield
    except Exception as error:
        kind = type(error)
        if kind.__module__ != "builtins" and not kind.__module__.startswith(_PACK + "trainer."):
            raise
        plain = next(base for base in kind.__mro__ if base.__module__ == "builtins")
        if plain is Exception:  # a signal, not a failure (TrainingCancelled): the node handles it
            raise
        message = node_message(str(error), renames)
        try:
            replacement = plain(message)
        except TypeError:  # a builtin that takes more than a message (UnicodeDecodeError...)
            replacement = RuntimeError(message)
        raise replacement from error


# --- a Train node's last run, for a page opened later -------------------------------------------------------------

class RunLog:
    """The messages a Train node's panel got for its last run, for a page opened or reloaded later to replay
    (web/dreambooth_chart_core.js, replayRun): ComfyUI re-sends no output after a reload, and a stopped or failed run
    has none. A new run (step 1, or another step count) starts the log again; a step's message keeps only step, total
    and loss once a newer one came, and past `max_steps` every other step is dropped (first and last kept)."""

    SLIM = ("type", "step", "total", "loss")

    def __init__(self, max_steps: int = 1000):
        self.max_steps = max_steps
        self.events: list[dict] = []
        self._total = None
        self._last_step: dict | None = None  # the one step message kept whole
        self._steps = 0

    def add(self, kind: str, data: dict) -> None:
        event = {"type": kind, **data}
        if kind == "progress":
            # NaN is not JSON for the page; its chart reads null as a skipped loss
            event = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in event.items()}
            if event["step"] <= 1 or event["total"] != self._total:
                self.events, self._last_step, self._steps = [], None, 0
            self._total = event["total"]
            if self._last_step is not None:  # slimmed in place: the chart's point is all the page needs of it
                for key in set(self._last_step) - set(self.SLIM):
                    del self._last_step[key]
            if self._steps >= self.max_steps:
                steps = [i for i, e in enumerate(self.events) if e["type"] == "progress"]
                dropped = set(steps[1:-1:2])
                self.events = [e for i, e in enumerate(self.events) if i not in dropped]
                self._steps -= len(dropped)
            self._last_step = event
            self._steps += 1
        self.events.append(event)
