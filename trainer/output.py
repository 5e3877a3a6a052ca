"""Before a run does any work: its output can be written, there is room for it, and writing it loses nothing the
user did not mean to replace. Failing here costs seconds; failing at the final save cost the whole run."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch

from . import metadata as meta
from .checkpoint import read_metadata
from .config import ConfigError

GB = 1e9
_SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_dtype(name: str) -> torch.dtype:
    return _SAVE_DTYPES[name]


def checkpoint_bytes(bundle, dtype: torch.dtype) -> int:
    """The size of the single file save_checkpoint writes for `bundle` (within the header's few kB)."""
    tensors = [t for m in bundle.modules for t in (*m.parameters(), *m.buffers())]
    tensors += list(bundle.passthrough.values())
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in tensors)


def state_bytes(cfg, bundle) -> int:
    """About what a resumable training state takes: the trained weights, and the optimizer's moments."""
    trained = [bundle.unet] + (bundle.text_encoders if cfg.train_text_encoder else [])
    params = sum(p.numel() for m in trained for p in m.parameters())
    per_param = (2 if cfg.bf16_weights else 4) + (8 if cfg.optimizer == "adamw" else 2)
    return params * per_param


def check_output(cfg, bundle, request: str, log) -> None:
    """Raise ConfigError, naming the file and the fix, when the output cannot or must not be written."""
    path = Path(cfg.output).resolve()
    check_writable(path.parent)
    if path.exists() and not cfg.overwrite:
        made_from = _recorded_request(path)
        if made_from != request:
            why = ("was trained from other settings or photos" if made_from else
                   "was not made by a DreamBooth Studio run")
            raise ConfigError(f"output: {path} already exists and {why}; choose another output name, or set "
                              "overwrite to replace it")
    needed = checkpoint_bytes(bundle, save_dtype(cfg.save_dtype))
    free = shutil.disk_usage(path.parent).free
    if free < needed * 1.02:
        raise ConfigError(f"output: saving needs about {needed / GB:.2f} GB and {path.parent} has {free / GB:.2f} GB "
                          "free; free some space or choose an output on another disk")
    state = state_bytes(cfg, bundle)
    if free < needed + state:
        log(f"Warning: {path.parent} has {free / GB:.2f} GB free: enough for the output ({needed / GB:.2f} GB) but not "
            f"also for a resumable state ({state / GB:.2f} GB), which stopping or checkpoint_every would write.")


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"output: cannot write into {folder} ({error.strerror or error}); choose a folder you can "
                          "write to") from None


def _recorded_request(path: Path) -> str:
    with contextlib.suppress(Exception):  # unreadable or not safetensors: not one of ours
        return read_metadata(path).get(meta.REQUEST, "")
    return ""
