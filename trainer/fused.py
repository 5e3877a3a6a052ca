"""Optimizer steps taken one trainable tensor at a time, for two memory levers: the step fused into the backward
pass (TrainConfig.fused_backward) and trained weights kept in bf16 (TrainConfig.bf16_weights).

fused_backward. An ordinary step needs every trainable tensor's gradient at once: for SD 1.5's UNet that is 3.2 GiB
of fp32 gradients beside the weights. Here each trainable tensor has an optimizer of its own, stepped by a hook as
soon as autograd has finished that tensor's gradient, which is then freed; so whole-model gradients never exist. This
is the approach of PyTorch's tutorial "How to save memory by fusing the optimizer step into the backward pass" and of
kohya sd-scripts' --fused_backward_pass.

AdamW and 8-bit AdamW update each tensor from its own gradient and moments only, so without clipping the weights are
those of the ordinary step. The costs:
- gradient clipping (max_grad_norm) is per tensor, as in kohya's scripts: the norm over all gradients is never
  available, so each gradient is scaled down to max_grad_norm on its own;
- fp16's GradScaler is not supported (config and loop refuse it): it must see every gradient before it may skip a
  step, and by then most tensors have been stepped.

bf16_weights. The trained weights (and so their gradients) are bf16: half of fp32's memory, 1.6 GiB less for SD 1.5's
UNet. Written back to bf16 (8 significant bits) by rounding to nearest, an AdamW update of about the learning rate
(2e-6) would vanish: it is far below half the spacing of bf16 values near a weight (2^-9 of its size). So each tensor
is stepped in fp32 and rounded back stochastically (stochastic_round_to_bf16_): up with probability equal to the
fraction of the gap covered, which is unbiased, so small updates survive on average, as in OneTrainer.

The fp32 copy costs one tensor's worth of memory, not the model's: for each tensor in turn, its bf16 weight is copied
into a scratch buffer shared by all tensors (sized to the largest), which its optimizer sees as a persistent fp32
"shadow" Parameter (so the optimizer's state stays keyed by one object and its moments are fp32, or 8-bit); the
gradient goes to fp32 in a second such buffer, the optimizer steps the shadow, and the result is rounded into the
bf16 weight. The random bits of a tensor's k-th rounding come from a generator seeded with (TrainConfig.seed, the
tensor's index, k): the same bits whatever order the tensors are stepped in (fused_backward steps them as their
gradients complete, an order that sharding changes) and wherever a run resumes (the counts are in the optimizer's
saved state). With fused_backward this happens in the backward hook (clipping per tensor, in fp32); without it, in
step() after backward (clipping over all gradients, the norm taken in fp32).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

_BF16_HIGH_BITS = -(1 << 16)  # 0xFFFF0000 as int32: the bits an fp32 shares with the bf16 value it starts with
_64_BITS = (1 << 64) - 1


def stochastic_round_to_bf16_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None = None, *,
                              noise: torch.Tensor | None = None, window: tuple[int, int] | None = None) -> torch.Tensor:
    """dst (bf16) <- src (fp32) rounded stochastically, in place; returns dst.

    src is rounded up (away from zero) to the next bf16 value with probability equal to the fraction of the gap it
    has covered, else down, so the result is always one of its two bf16 neighbours and its mean is src exactly.
    bf16 is the upper 16 bits of fp32: adding a uniform random integer in [0, 2^16) to src's bit pattern (as int32;
    the carry runs into the mantissa and on into the exponent, for either sign, since the sign is a separate bit)
    and clearing the low 16 bits rounds up exactly when the random number reaches the gap's unfilled part.

    Values already in bf16 come back unchanged (their low 16 bits are zero); +-inf stays +-inf; NaN stays NaN (its
    payload alone could carry to inf or wrap to 0); finite values beyond bf16's largest become inf with probability
    growing to 1 as they near fp32's largest, where rounding to nearest makes them inf.

    noise: a buffer (int32 or fp32, src's shape) to draw the random bits into instead of allocating one; the
    optimizer passes its gradient scratch. src is left as it is.
    window=(total, start): src is elements start... of a tensor of `total` elements (a shard of it): the bits are
    drawn for the whole tensor (into `noise`, of at least `total` elements) and src takes its own, so that it is
    rounded exactly as it would be within the whole tensor.
    """
    if src.dtype != torch.float32 or dst.dtype != torch.bfloat16 or src.shape != dst.shape:
        raise ValueError(f"stochastic rounding: needs an fp32 source and a bf16 destination of one shape, got "
                         f"{src.dtype} {tuple(src.shape)} -> {dst.dtype} {tuple(dst.shape)}")
    if window is None:
        bits = (torch.empty(src.shape, dtype=torch.int32, device=src.device) if noise is None
                else noise.view(torch.int32))
        bits.random_(0, 1 << 16, generator=generator)
    else:
        total, start = window
        drawn = noise.view(torch.int32).reshape(-1)[:total]
        drawn.random_(0, 1 << 16, generator=generator)
        bits = drawn[start:start + src.numel()].view(src.shape)
    bits.add_(src.view(torch.int32))
    bits.bitwise_and_(_BF16_HIGH_BITS)
    dst.copy_(bits.view(torch.float32))  # exact: the value is a bf16 value
    dst.masked_fill_(src.isnan(), float("nan"))
    return dst


def rounding_seed(seed: int) -> int:
    """The stochastic rounding's seed for TrainConfig.seed: not the seed itself, whose CPU stream
    trainer/randomness.py draws the noise from."""
    return (seed * 0x9E3779B97F4A7C15 + 0x6A09E667F3BCC909) % (1 << 63)


def clip_coefficient(norm: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """What gradients of this norm are scaled by to clip them to max_grad_norm, at most 1: torch's
    clip_grad_norm_ formula (elementwise, for a tensor of norms)."""
    return (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)


def mixed_seed(*values: int) -> int:
    """A generator seed (63 bits) from several integers, each stirred in with splitmix64's steps: nearby inputs
    (tensor 3's round 7, tensor 4's round 7) give unrelated seeds."""
    x = 0
    for value in values:
        x = (x + value + 0x9E3779B97F4A7C15) & _64_BITS
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _64_BITS
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _64_BITS
        x ^= x >> 31
    return x >> 1


class PerTensorOptimizer(torch.optim.Optimizer):
    """One optimizer per trainable tensor, seen as one optimizer by the LR scheduler and the saved state.

    step() clips over all gradients (max_grad_norm) and steps each tensor. With rounding_seed, the tensors are bf16
    and are stepped through fp32 shadows, then stochastically rounded back (see the module docstring).

    Its param_groups are the per-tensor optimizers' own group dicts, so a scheduler that sets group["lr"] drives them
    all. state_dict() is laid out like an ordinary optimizer's with one group per tensor, so trainer/state.py saves
    and restores it unchanged; with bf16 weights it holds the rounding generator's state too.
    """

    in_backward = False  # FusedBackward: each tensor is stepped inside backward() instead of in step()

    # Optimizer.__init__ is not called: this object owns no groups or state, only the per-tensor optimizers.
    # (It subclasses Optimizer because torch's LR schedulers accept nothing else.)
    def __init__(self, params, make_one: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                 max_grad_norm: float = 0.0, *, rounding_seed: int | None = None,
                 windows: list[tuple[int, int]] | None = None):
        """windows: for tensors that are shards (trainer/sharding.py), each one's (whole tensor's size, its start in
        it), so that the rounding draws what it would for the whole tensor (stochastic_round_to_bf16_)."""
        self.params = list(params)
        self.max_grad_norm = max_grad_norm
        self.shadows: list[torch.nn.Parameter] | None = None
        self.generator: torch.Generator | None = None
        self.rounds = [0] * len(self.params)  # how often each tensor has been rounded (bf16 weights)
        self.windows = windows
        if rounding_seed is not None:
            self._make_shadows(rounding_seed)
        self.optimizers = [make_one([p]) for p in (self.shadows if self.shadows is not None else self.params)]
        # Each one's update, chosen once: 8-bit AdamW's step_one (optim.py) skips the wrapper torch puts on step().
        self._updates = [getattr(optimizer, "step_one", optimizer.step) for optimizer in self.optimizers]
        self.defaults = self.optimizers[0].defaults if self.optimizers else {}

    def _make_shadows(self, seed: int) -> None:
        not_bf16 = sorted({str(p.dtype) for p in self.params if p.dtype != torch.bfloat16})
        devices = {p.device for p in self.params}
        if not_bf16 or len(devices) > 1:
            raise ValueError(f"bf16 weights: every trained tensor must be bf16 on one device, got {not_bf16} on "
                             f"{sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        largest = max((p.numel() for p in self.params), default=0)
        # One fp32 weight and one fp32 gradient of the largest tensor's size: the only fp32 copies there are.
        self._weight_scratch = torch.empty(largest, dtype=torch.float32, device=device)
        self._grad_scratch = torch.empty(largest, dtype=torch.float32, device=device)
        self.shadows = [torch.nn.Parameter(self._scratch(self._weight_scratch, p)) for p in self.params]
        self._grad_views = [self._scratch(self._grad_scratch, p) for p in self.params]  # views: no memory of their own
        self.generator, self.rounding_seed = torch.Generator(device), seed
        if self.windows is not None:  # the random bits of the largest whole tensor
            self._draw_scratch = torch.empty(max((total for total, _ in self.windows), default=0), dtype=torch.int32,
                                             device=device)

    @staticmethod
    def _scratch(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return buffer[:like.numel()].view(like.shape)

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: load_state_dict gives every per-tensor optimizer new group dicts.
        return [optimizer.param_groups[0] for optimizer in self.optimizers]

    def step_tensor(self, i: int, clip_coef: torch.Tensor | None = None) -> None:
        """Step tensor i from its gradient, scaled by clip_coef (clipping decided by the caller: over all gradients,
        or over a sharded tensor's shards) or, inside backward, clipped on its own. The caller frees the gradient."""
        param = self.params[i]
        if param.grad is None:
            return
        stepped = param
        if self.shadows is not None:
            stepped = self.shadows[i]
            with torch.no_grad():
                stepped.copy_(param)
            stepped.grad = self._grad_views[i].copy_(param.grad)
        if clip_coef is not None:
            stepped.grad.mul_(clip_coef)
        elif self.in_backward and self.max_grad_norm:  # per tensor: see the module docstring
            # clip_grad_norm_'s arithmetic for one tensor, without its handling of many (on a GPU 2 kernels fewer)
            stepped.grad.mul_(clip_coefficient(torch.linalg.vector_norm(stepped.grad), self.max_grad_norm))
        self._updates[i]()
        if self.shadows is not None:
            stepped.grad = None
            self.generator.manual_seed(mixed_seed(self.rounding_seed, i, self.rounds[i]))
            self.rounds[i] += 1
            with torch.no_grad():  # the gradient scratch is free again: it takes the random bits
                if self.windows is None:
                    stochastic_round_to_bf16_(param, stepped, self.generator, noise=self._grad_views[i])
                else:
                    stochastic_round_to_bf16_(param, stepped, self.generator, noise=self._draw_scratch,
                                              window=self.windows[i])

    def _clip_coef(self) -> torch.Tensor | None:
        """max_grad_norm over the norm of all gradients (taken in fp32), at most 1, as clip_grad_norm_ scales."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not self.max_grad_norm or not grads:
            return None
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
        return clip_coefficient(torch.linalg.vector_norm(norms), self.max_grad_norm)

    def step(self, closure=None):
        """Clip over all gradients, then step each tensor (FusedBackward: nothing left to do)."""
        clip_coef = self._clip_coef()
        for i in range(len(self.params)):
            self.step_tensor(i, clip_coef)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """{"state": {i: state of tensor i}, "param_groups": [group of tensor i with "params": [i]]}, and with bf16
        weights "stochastic_rounding": {"rounds": how often each tensor has been rounded}."""
        state, groups = {}, []
        for i, optimizer in enumerate(self.optimizers):
            own = optimizer.state_dict()
            if 0 in own["state"]:  # no entry before the tensor's first step
                state[i] = own["state"][0]
            groups.append({**own["param_groups"][0], "params": [i]})
        saved = {"state": state, "param_groups": groups}
        if self.generator is not None:
            saved["stochastic_rounding"] = {"rounds": torch.tensor(self.rounds, dtype=torch.int64)}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if [g["params"] for g in groups] != [[i] for i in range(len(self.optimizers))]:
            raise ValueError(f"optimizer state: not saved one tensor at a time for these {len(self.optimizers)} "
                             "tensors")
        rounding = state_dict.get("stochastic_rounding")
        if (rounding is None) != (self.generator is None):
            raise ValueError("optimizer state: saved " + ("without" if rounding is None else "with")
                             + " bf16 weights, loaded " + ("with" if rounding is None else "without"))
        for i, (optimizer, group) in enumerate(zip(self.optimizers, groups)):
            state = {0: state_dict["state"][i]} if i in state_dict["state"] else {}
            optimizer.load_state_dict({"state": state, "param_groups": [{**group, "params": [0]}]})
        if rounding is not None:  # (saved before the counts: one generator for all tensors; go on from their steps)
            self.rounds = (rounding["rounds"].tolist() if "rounds" in rounding else
                           [int(state_dict["state"].get(i, {}).get("step", 0)) for i in range(len(self.params))])


class FusedBackward(PerTensorOptimizer):
    """The per-tensor optimizer stepped inside backward(): see stepping_in_backward and the module docstring."""

    in_backward = True

    @contextlib.contextmanager
    def stepping_in_backward(self):
        """While inside, backward() steps each tensor as soon as its gradient is complete, then frees it.

        The hooks come off on the way out, also on errors: the model is used afterwards (sampling, the caller)."""
        handles = [p.register_post_accumulate_grad_hook(self._step_hook(i)) for i, p in enumerate(self.params)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _step_hook(self, i: int):
        def step(param: torch.Tensor) -> None:
            # Autograd calls this once all contributions to param.grad are summed, and every node that needed
            # param's old value has run, so updating it in place here is safe.
            self.step_tensor(i)
            param.grad = None  # the memory saved: this gradient is gone before the next one is complete
        return step

    def step(self, closure=None):
        """Nothing is left to do: each tensor was stepped inside backward().

        Kept (like transformers' LayerWiseDummyOptimizer) so that code written for one optimizer works, including
        the LR scheduler's check that optimizer.step() runs before its own step()."""
        return None
