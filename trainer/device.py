"""The device and precision policy of a run, in one place for every host (command line, ComfyUI nodes, benchmark).

A memory preset (trainer/presets.py says what each sets) is resolved for the device at hand; training computes in
the autocast dtype that `training_precision` picks; everything that only draws (class images,
previews, token probing, encoding the photos) runs its frozen weights in `inference_dtype`: bf16 where the GPU has it
in hardware, fp16 on older GPUs, fp32 on the CPU (where half precision is slow or missing).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import ConfigError, TrainConfig
from .families import Family
from .presets import apply_preset, describe_levers

GIB = 2 ** 30


@dataclass(frozen=True)
class EmulatedGPU:
    total_memory: int
    bf16: bool = True


_emulated: EmulatedGPU | None = None


@contextlib.contextmanager
def emulating_gpu(total_memory: int, bf16: bool = True):
    """While inside, every choice here is made as for a GPU of `total_memory` bytes (with native bf16 or not), whatever
    the device: how bench/memory_model.py and the tests run, on the CPU, exactly what a GPU run would."""
    global _emulated
    previous, _emulated = _emulated, EmulatedGPU(total_memory, bf16)
    try:
        yield _emulated
    finally:
        _emulated = previous


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware (NVIDIA Ampere and newer, AMD via ROCm). torch.cuda.is_bf16_supported() alone also says yes
    on older GPUs, where bf16 is emulated and slow."""
    if _emulated is not None:
        return _emulated.bf16
    if device.type != "cuda":
        return False
    return torch.version.hip is not None or torch.cuda.get_device_properties(device).major >= 8


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The training step's autocast dtype for mixed_precision `name`, or None for full fp32."""
    if name == "auto":
        if device.type != "cuda" and _emulated is None:
            return None
        return torch.bfloat16 if has_native_bf16(device) else torch.float16
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def training_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The training step's autocast dtype for this config on this device (None: fp32), or ConfigError for levers the
    device cannot give: bf16_weights computes in bf16 ('auto' means bf16 with it, the CPU included), and
    fused_backward cannot use fp16's loss scaling."""
    precision = resolve_precision(cfg.mixed_precision, device)
    if cfg.bf16_weights:
        if precision is None and cfg.mixed_precision == "auto":
            precision = torch.bfloat16
        elif precision != torch.bfloat16:  # 'auto' on a GPU without bf16 (validate refuses 'fp16' and 'no')
            raise ConfigError("bf16_weights: this GPU has no bf16, so its weights cannot be kept in bf16 "
                              "(mixed_precision 'auto' means fp16 here); turn bf16_weights off")
    if cfg.fused_backward and precision == torch.float16:  # 'auto' on a GPU without bf16 (validate refuses 'fp16')
        raise ConfigError("fused_backward: this GPU has no bf16, so mixed_precision 'auto' means fp16, whose loss "
                          "scaling must see every gradient before any step; set mixed_precision to 'no' or turn "
                          "fused_backward off")
    return precision


def with_memory_preset(cfg: TrainConfig, device: torch.device, log, family: Family) -> TrainConfig:
    """`cfg` with its memory preset's levers for this device and model family (trainer/presets.py: SDXL has levers of
    its own), and a log line saying which, for which model family."""
    if cfg.memory_preset == "custom":
        log(f"Training {family.title} at {cfg.resolution} px on {describe(device)}; memory preset 'custom': "
            f"{describe_levers(cfg)}")
        return cfg
    resolved = apply_preset(cfg, cfg.memory_preset, has_bf16=has_native_bf16(device),
                            total_memory=total_memory(device), family=family.name)
    chosen = resolved.memory_preset if resolved is not cfg else "none: the settings as given"
    log(f"Training {family.title} at {cfg.resolution} px; memory preset {cfg.memory_preset!r} on {describe(device)}: "
        f"{chosen}; {describe_levers(resolved)}")
    return resolved


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype of frozen weights that only draw: half the memory of fp32 and the GPU's fast path."""
    if device.type != "cuda" and _emulated is None:
        return torch.float32
    return torch.bfloat16 if has_native_bf16(device) else torch.float16


def total_memory(device: torch.device) -> int | None:
    """The card's memory in bytes (None for the CPU): what the 'auto' memory preset goes by."""
    if _emulated is not None:
        return _emulated.total_memory
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def describe(device: torch.device) -> str:
    """e.g. 'NVIDIA GeForce RTX 3060, 11.8 GiB' or 'cpu', for logs and error messages."""
    total = total_memory(device)
    if _emulated is not None:
        return f"a GPU of {total / GIB:.1f} GiB, emulated on {device.type}"
    return f"{torch.cuda.get_device_name(device)}, {total / GIB:.1f} GiB" if total else device.type


def fused_adamw(device: torch.device) -> bool:
    """torch's fused AdamW kernel: one launch for all tensors and no temporaries the size of the moments (the
    default multi-tensor step makes some), on GPUs; the CPU keeps torch's default."""
    return device.type == "cuda" or _emulated is not None
