"""The optimizer step fused into the backward pass (TrainConfig.fused_backward), a memory lever.

An ordinary step needs every trainable tensor's gradient at once: for SD 1.5's UNet that is 3.2 GiB of fp32 gradients
beside the weights. Here each trainable tensor has an optimizer of its own, stepped by a hook as soon as autograd has
finished that tensor's gradient, which is then freed; so whole-model gradients never exist. This is the approach of
PyTorch's tutorial "How to save memory by fusing the optimizer step into the backward pass" and of kohya sd-scripts'
--fused_backward_pass.

AdamW and 8-bit AdamW update each tensor from its own gradient and moments only, so without clipping the weights are
those of the ordinary step. The costs:
- gradient clipping (max_grad_norm) is per tensor, as in kohya's scripts: the norm over all gradients is never
  available, so each gradient is scaled down to max_grad_norm on its own;
- fp16's GradScaler is not supported (config and loop refuse it): it must see every gradient before it may skip a
  step, and by then most tensors have been stepped.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch


class FusedBackward(torch.optim.Optimizer):
    """One optimizer per trainable tensor, seen as one optimizer by the LR scheduler and the saved state.

    Its param_groups are the per-tensor optimizers' own group dicts, so a scheduler that sets group["lr"] drives them
    all. state_dict() is laid out like an ordinary optimizer's with one group per tensor, so trainer/state.py saves
    and restores it unchanged.
    """

    # Optimizer.__init__ is not called: this object owns no groups or state, only the per-tensor optimizers.
    # (It subclasses Optimizer because torch's LR schedulers accept nothing else.)
    def __init__(self, params, make_one: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                 max_grad_norm: float = 0.0):
        self.params = list(params)
        self.optimizers = [make_one([p]) for p in self.params]
        self.max_grad_norm = max_grad_norm
        self.defaults = self.optimizers[0].defaults if self.optimizers else {}

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: load_state_dict gives every per-tensor optimizer new group dicts.
        return [optimizer.param_groups[0] for optimizer in self.optimizers]

    @contextlib.contextmanager
    def stepping_in_backward(self):
        """While inside, backward() steps each tensor as soon as its gradient is complete, then frees it.

        The hooks come off on the way out, also on errors: the model is used afterwards (sampling, the caller)."""
        handles = [p.register_post_accumulate_grad_hook(self._step_hook(optimizer))
                   for p, optimizer in zip(self.params, self.optimizers)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _step_hook(self, optimizer: torch.optim.Optimizer):
        def step(param: torch.Tensor) -> None:
            # Autograd calls this once all contributions to param.grad are summed, and every node that needed
            # param's old value has run, so updating it in place here is safe.
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(param, self.max_grad_norm)  # per tensor: see the module docstring
            optimizer.step()
            param.grad = None  # the memory saved: this gradient is gone before the next one is complete
        return step

    def step(self, closure=None):
        """Nothing is left to do: each tensor was stepped inside backward().

        Kept (like transformers' LayerWiseDummyOptimizer) so that code written for one optimizer works, including
        the LR scheduler's check that optimizer.step() runs before its own step()."""
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """{"state": {i: state of tensor i}, "param_groups": [group of tensor i with "params": [i]]}."""
        state, groups = {}, []
        for i, optimizer in enumerate(self.optimizers):
            own = optimizer.state_dict()
            if 0 in own["state"]:  # no entry before the tensor's first step
                state[i] = own["state"][0]
            groups.append({**own["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if [g["params"] for g in groups] != [[i] for i in range(len(self.optimizers))]:
            raise ValueError(f"optimizer state: not saved with fused_backward for these {len(self.optimizers)} tensors")
        for i, (optimizer, group) in enumerate(zip(self.optimizers, groups)):
            state = {0: state_dict["state"][i]} if i in state_dict["state"] else {}
            optimizer.load_state_dict({"state": state, "param_groups": [{**group, "params": [0]}]})
