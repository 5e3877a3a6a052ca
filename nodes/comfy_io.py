"""Conversions between ComfyUI's data and the engine's, with no ComfyUI import (tested without ComfyUI)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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


def require_class_noun(value: str) -> str:
    """The class noun as the prompts use it; an empty one would make the class prompt 'a' and train on nothing."""
    noun = " ".join(value.split())
    if not noun:
        raise ValueError("class_noun is empty: type what the subject is, e.g. 'dog', 'backpack' or 'man' (the "
                         "prompts become 'a [identifier] dog' and 'a dog').")
    return noun


# --- errors as a node user reads them -----------------------------------------------------------------------------

# The engine's messages name its settings and, now and then, a command; a node user sees inputs and nodes.
_COMMAND = re.compile(r"`python -m trainer ([\w-]+)`(?: or (the [\w ]+? node))?")
_COMMAND_NODES = {"pick-token": "the Pick Rare Token node"}
_PACK = __name__.removesuffix("nodes.comfy_io")  # "<pack folder>." inside ComfyUI, "" in the tests


def node_message(message: str, renames: dict[str, str]) -> str:
    """`message` in a node's words: each engine setting (`max_train_steps` or `--max-train-steps`) named as the node
    input in `renames`, and `python -m trainer pick-token` as the node that does the same."""
    message = _COMMAND.sub(lambda m: m.group(2) or _COMMAND_NODES.get(m.group(1), m.group(0)), message)
    for setting, name in renames.items():
        flag = "--" + setting.replace("_", "-")
        message = re.sub(rf"(?<![\w-])(?:{re.escape(setting)}|{re.escape(flag)})(?![\w-])", name, message)
    return message


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


# --- the training log ----------------------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepLog:
    """Which training steps get a line in the server log: the first, the last, and then one every `every_steps` steps
    or `every_s` seconds, whichever comes first; so a headless run shows it is alive without flooding the log."""

    def __init__(self, every_steps: int = 10, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.every_steps, self.every_s, self.clock = every_steps, every_s, clock
        self.last_step: int | None = None
        self.last_time = 0.0

    def line(self, info) -> str | None:
        """A log line for this step (a trainer.callbacks.StepInfo), or None when it is not due."""
        now = self.clock()
        due = (self.last_step is None or info.step >= info.total or info.step - self.last_step >= self.every_steps
               or now - self.last_time >= self.every_s)
        if not due:
            return None
        self.last_step, self.last_time = info.step, now
        return (f"Step {info.step}/{info.total}: loss {info.loss:.4f} (instance {info.instance_loss:.4f}, prior "
                f"{info.prior_loss:.4f}), learning rate {info.lr:.2g}, {_duration(info.elapsed_s)} elapsed, about "
                f"{_duration(info.eta_s)} left")
