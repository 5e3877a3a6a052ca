"""Optimizers and learning-rate schedules."""
from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from .config import ConfigError, TrainConfig
from .fused import FusedBackward, PerTensorOptimizer, rounding_seed


def resolve_optimizer(name: str, device: torch.device) -> str:
    """'auto' means 8-bit AdamW where bitsandbytes has a CUDA kernel, plain AdamW elsewhere."""
    if name != "auto":
        return name
    return "adamw8bit" if device.type == "cuda" and _bitsandbytes() is not None else "adamw"


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """cfg.optimizer's optimizer; with cfg.fused_backward, one per tensor, stepped in backward; with
    cfg.bf16_weights, one per tensor through fp32 shadows, rounded back stochastically (trainer/fused.py)."""
    name = resolve_optimizer(cfg.optimizer, device)
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if name == "adamw":
        make = torch.optim.AdamW
    else:
        bnb = _bitsandbytes()
        if bnb is None:
            raise ConfigError("optimizer: 'adamw8bit' needs bitsandbytes, which is not installed or failed to load; "
                              "run `pip install bitsandbytes` or choose optimizer 'adamw' (uses more memory)")
        make = bnb.optim.AdamW8bit
    if cfg.fused_backward or cfg.bf16_weights:
        # foreach batches kernels over many tensors; a one-tensor optimizer has nothing to batch
        per_tensor = dict(foreach=False) if make is torch.optim.AdamW else {}
        kind = FusedBackward if cfg.fused_backward else PerTensorOptimizer
        return kind(params, lambda tensors: make(tensors, **kwargs, **per_tensor), cfg.max_grad_norm,
                    rounding_seed=rounding_seed(cfg.seed) if cfg.bf16_weights else None)
    return make(params, **kwargs)


def make_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=cfg.max_train_steps)


def _bitsandbytes():
    try:
        import bitsandbytes
    except Exception:  # a broken CUDA install raises more than ImportError
        return None
    return bitsandbytes
