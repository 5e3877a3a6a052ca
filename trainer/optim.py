"""Optimizers and learning-rate schedules."""
from __future__ import annotations

import functools

import torch
from diffusers.optimization import get_scheduler

from .config import ConfigError, TrainConfig
from .device import fused_adamw
from .fused import FusedBackward, PerTensorOptimizer, rounding_seed


def resolve_optimizer(name: str, device: torch.device) -> str:
    """'auto' means 8-bit AdamW where bitsandbytes has a CUDA kernel, plain AdamW elsewhere."""
    if name != "auto":
        return name
    return "adamw8bit" if device.type == "cuda" and _bitsandbytes() is not None else "adamw"


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device,
                   windows: list[tuple[int, int]] | None = None) -> torch.optim.Optimizer:
    """cfg.optimizer's optimizer; with cfg.fused_backward, one per tensor, stepped in backward; with
    cfg.bf16_weights, one per tensor through fp32 shadows, rounded back stochastically (trainer/fused.py; `windows`:
    where each of `params` lies in its whole tensor when they are shards)."""
    name = resolve_optimizer(cfg.optimizer, device)
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    per_tensor = cfg.fused_backward or cfg.bf16_weights
    if name == "adamw":
        make = torch.optim.AdamW
        if fused_adamw(device):
            kwargs["fused"] = True
        elif per_tensor:
            kwargs["foreach"] = False  # foreach batches kernels over many tensors; one tensor has nothing to batch
    elif name == "adafactor":
        make = adafactor()
        kwargs = adafactor_settings(cfg)
    else:
        make = adamw8bit_without_syncs()
    if per_tensor:
        kind = FusedBackward if cfg.fused_backward else PerTensorOptimizer
        return kind(params, lambda tensors: make(tensors, **kwargs), cfg.max_grad_norm,
                    rounding_seed=rounding_seed(cfg.seed) if cfg.bf16_weights else None, windows=windows)
    return make(params, **kwargs)


def adafactor() -> type[torch.optim.Optimizer]:
    """transformers' Adafactor (Shazeer & Stern 2018), as kohya's sd-scripts fine-tunes SDXL with it."""
    from transformers.optimization import Adafactor
    return Adafactor


def adafactor_settings(cfg: TrainConfig) -> dict:
    """Adafactor at cfg.learning_rate as given (no relative step size, no scaling by the weights' size, no warm-up of
    its own: the LR schedule is the run's) and without the first moment (beta1 None), so that its state is only the
    factored second moment: a row and a column average per matrix (for a conv weight, per 3x3 kernel row and column),
    0.91 GiB for SDXL's UNet against 4.8 GiB for 8-bit AdamW. Update clipping at RMS 1 and the decay rate -0.8 are
    its defaults; weight decay is the run's adam_weight_decay (decoupled, times the learning rate, as AdamW's)."""
    return dict(lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False, beta1=None,
                weight_decay=cfg.adam_weight_decay)


def make_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=cfg.max_train_steps)


def adamw8bit_without_syncs() -> type[torch.optim.Optimizer]:
    """bitsandbytes' 8-bit AdamW, stepped without its wait for the GPU after every tensor.

    bitsandbytes' step() calls torch.cuda.synchronize() after each tensor's update (bitsandbytes.utils.sync_gpu), which
    paged optimizers need and ours do not: the updates are ordinary kernels on the current stream, ordered like any
    other. Those waits cost little at the end of a step, but inside the backward pass (fused_backward steps each
    tensor there) each one stalls the queue of backward kernels, for every one of SD 1.5's 686 tensors. The loop
    below is bitsandbytes' own, less the waits; the updates are the same kernels with the same arguments.
    """
    bnb = _bitsandbytes()
    if bnb is None:
        raise ConfigError("optimizer: 'adamw8bit' needs bitsandbytes, which is not installed or failed to load; "
                          "run `pip install bitsandbytes` or choose optimizer 'adamw' (uses more memory)")
    return _no_sync_class(bnb.optim.AdamW8bit)


@functools.cache
def _no_sync_class(base: type) -> type:
    class AdamW8bit(base):
        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is not None:
                        self._update(group, p, gindex, pindex)
            return loss

        def step_one(self) -> None:
            """step() for an optimizer of one tensor (trainer/fused.py's, one per tensor) without what
            torch.optim.Optimizer wraps every step() in (a profiler mark, a TorchDynamo guard, the grad mode, the
            global hooks): that wrapper ran once per tensor, 686 times a step for SD 1.5's UNet, and cost more host
            time than the update's launch itself (bench/step_profile.py). The update is step()'s, with the same
            arguments; hooks registered on this optimizer (register_step_pre_hook / _post_hook) still run."""
            for hook in self._optimizer_step_pre_hooks.values():
                hook(self, (), {})
            group = self.param_groups[0]
            with torch.no_grad():
                self._update(group, group["params"][0], 0, 0)
            for hook in self._optimizer_step_post_hooks.values():
                hook(self, (), {})

        def _update(self, group, p, gindex, pindex) -> None:
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            if len(self.state[p]) == 0:
                self.init_state(group, p, gindex, pindex)
            self.update_step(group, p, gindex, pindex)

    AdamW8bit.__qualname__ = AdamW8bit.__name__ = "AdamW8bitWithoutSyncs"
    return AdamW8bit


def _bitsandbytes():
    try:
        import bitsandbytes
    except Exception:  # a broken CUDA install raises more than ImportError
        return None
    return bitsandbytes
