"""Sharded data parallel: PyTorch's FSDP (fully_shard) across the processes of a data-parallel run.

Each process keeps 1/N of every trained tensor, of its gradient and of the optimizer's state, and gathers one block's
full weights only while that block runs (a UNet resnet or attention block, a text-encoder layer), so what grows with
the model's size is divided by N. The gradients are reduce-scattered: each process receives the global batch's
gradient of its own shards (FSDP averages over the processes; the loss is weighted so that the average is the global
batch's mean, as in unsharded data parallel).

The optimizer steps plain tensors that are this process's shards (`local`), so any element-wise optimizer works on
them unchanged: AdamW, bitsandbytes' 8-bit AdamW (per block of its own shard), and the bf16 weights' stochastic
rounding. Gradient clipping needs the norm over all shards: one collective. With fused_backward, each block's shards
are stepped as soon as FSDP has reduce-scattered their gradients, inside the backward pass, so that the gradients'
shards never exist together either (stepping_in_backward). When training ends, the full weights are gathered into
plain modules on rank 0, which draws the previews and writes the output as in any other run.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from . import state as state_io
from .config import ConfigError
from .fused import clip_coefficient

# The blocks gathered one at a time: each holds a small share of the weights, so the full weights of one block (and
# the next one, fetched ahead) are all a process holds beyond its shards. A transformer block alone, not the whole
# Transformer2DModel around it: SDXL's deepest ones hold 10 blocks, 0.35 B weights (1.4 GB in fp32).
UNIT_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock", "Transformer2DModel", "CLIPEncoderLayer")


def units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules sharded as units of their own, innermost first (an outer unit keeps what its inner ones do
    not hold), then the module itself, which keeps the rest."""
    return [m for m in reversed(list(module.modules())) if type(m).__name__ in UNIT_CLASSES] + [module]


def owners(module: torch.nn.Module) -> list[int]:
    """For each of module.parameters(), in order, the index in units(module) of the unit that holds it: the
    innermost unit it is in (FSDP gathers and reduces each unit's own weights together)."""
    found = units(module)
    owner = {}
    for index in reversed(range(len(found))):  # outermost first: inner units take their weights over
        for param in found[index].parameters():
            owner[id(param)] = index
    return [owner[id(param)] for param in module.parameters()]


def unit_sizes(module: torch.nn.Module) -> list[int]:
    """How many weights each of units(module) holds of its own (what one all-gather brings in full)."""
    sizes = [0] * len(units(module))
    for param, index in zip(module.parameters(), owners(module)):
        sizes[index] += param.numel()
    return sizes


def asked(flag: bool) -> bool:
    """Sharding was asked for: --shard, or an accelerate config with FSDP (accelerate launch sets ACCELERATE_USE_FSDP)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def refusals(cfg) -> list[str]:
    """The settings that do not combine with sharding, each with why and what to do."""
    problems = []
    if cfg.mixed_precision == "fp16":
        problems.append("mixed_precision 'fp16': its loss scaler would see only this process's shards of the "
                        "gradients; use 'bf16' (NVIDIA Ampere and newer) or 'no'")
    if cfg.optimizer == "adafactor":
        problems.append("optimizer 'adafactor': its factored statistics average over whole rows and columns of a "
                        "weight, which the processes hold in pieces; use 'adamw8bit' (sharded, its 8-bit state is "
                        "divided by the number of processes too) or 'adamw'")
    if cfg.compile_unet:
        problems.append("compile_unet: not combined with sharding yet; turn it off")
    if cfg.channels_last:
        problems.append("channels_last: the shards are rows of contiguous weights; turn it off")
    return problems


class Shards:
    """The trained modules sharded across the processes (see the module docstring)."""

    def __init__(self, modules: dict[str, torch.nn.Module], processes):
        from torch.distributed.fsdp import fully_shard

        self.processes = processes
        # Our forward passes never change a module's output in place (tests/test_sharded.py holds the sharded
        # gradients to the unsharded ones), so FSDP's warning that a text encoder returns a view is noise here.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        self.plain = {name: (type(module), module.config) for name, module in modules.items()}
        # Each parameter's unit, numbered across the modules (their parameters keep their order when sharded).
        self.unit_of = [(number, index) for number, module in enumerate(modules.values()) for index in owners(module)]
        for module in modules.values():
            recordable = _recordable_outputs(module)
            for unit in units(module):  # the module itself last: embeddings, in/out convolutions, final norms
                fully_shard(unit)
            _keep_recordable_outputs(module, recordable)
        self.modules = modules
        self.params = [p for m in modules.values() for p in m.parameters()]
        with torch.no_grad():  # the local pieces of the sharded weights: the same memory, stepped in place
            self.local = [torch.nn.Parameter(p.to_local(), requires_grad=p.requires_grad) for p in self.params]
        self.windows = [_window(p) for p in self.params]

    def loss_weight(self, local_n: int, global_n: int) -> float:
        """FSDP averages the processes' gradients; this weight makes the average the global batch's gradient when
        the processes' shares differ (an epoch's last batch)."""
        return local_n * self.processes.size / global_n

    def take_gradients(self, max_grad_norm: float) -> None:
        """Each shard's gradient onto the tensor the optimizer steps, clipped by the total norm over all shards
        (as torch.nn.utils.clip_grad_norm_ would over the whole model)."""
        grads = []
        for param, local in zip(self.params, self.local):
            local.grad = param.grad.to_local() if param.grad is not None else None
            param.grad = None  # the next backward starts from nothing, as zero_grad(set_to_none) would
            if local.grad is not None:
                grads.append(local.grad)
        if not max_grad_norm:
            return
        squares = torch.zeros((), dtype=torch.float32, device=self.processes.collective_device())
        for grad in grads:
            squares += grad.float().pow(2).sum().to(squares.device)
        dist.all_reduce(squares)
        clip = clip_coefficient(squares.sqrt(), max_grad_norm)
        for grad in grads:
            grad.mul_(clip.to(grad.device))

    @contextlib.contextmanager
    def stepping_in_backward(self, optimizer, max_grad_norm: float):
        """fused_backward, sharded: while inside, backward() steps each shard as soon as its gradient has arrived, and
        frees it (the memory saved: every gradient's shard at once, the weights' size / N).

        FSDP reduce-scatters one unit's gradients together and then calls each of its sharded weights' post-accumulate-
        grad hooks in turn (on a GPU on its reduce stream, which the default stream waits for before using the
        weights again). A unit's shards are stepped once the next unit's gradients arrive, or when backward() ends
        (the modules' roots: FSDP reduces them in its final callback), with one collective for the whole tensors'
        norms: each tensor is clipped on its own to max_grad_norm, as unsharded fused_backward clips
        (trainer/fused.py), by its norm over all shards."""
        pending: list[int] = []

        def step_pending() -> None:
            grads = [self.local[i].grad for i in pending]
            coefs = [None] * len(pending)
            if max_grad_norm and grads:
                squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).pow(2)
                squares = squares.to(self.processes.collective_device())
                dist.all_reduce(squares)
                coefs = clip_coefficient(squares.sqrt(), max_grad_norm).to(grads[0].device).unbind()
            for i, coef in zip(pending, coefs):
                optimizer.step_tensor(i, coef)
                self.local[i].grad = None
            pending.clear()

        def hook(i: int):
            def arrived(param) -> None:
                if pending and self.unit_of[pending[-1]] != self.unit_of[i]:
                    step_pending()  # the previous unit's gradients are all here (FSDP reduces a unit at once)
                self.local[i].grad = param.grad.to_local()
                param.grad = None
                pending.append(i)
            return arrived

        handles = [p.register_post_accumulate_grad_hook(hook(i)) for i, p in enumerate(self.params) if p.requires_grad]
        try:
            yield
            step_pending()
        finally:
            for i in pending:  # (an error in backward(): nothing half-stepped is kept for the next one)
                self.local[i].grad = None
            pending.clear()
            for handle in handles:
                handle.remove()

    def load_full_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Full weights (a saved state's) into the sharded module: each process keeps its shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(self.modules[name], state, options=StateDictOptions(full_state_dict=True))

    def full_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every module's full weights on rank 0's CPU (empty on the others); all processes must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {name: get_model_state_dict(module, options=options) for name, module in self.modules.items()}

    def stage_state(self, state_dir: Path, optimizer) -> dict[str, dict[str, torch.Tensor]]:
        """A state save's part that every process does: the full weights gathered for rank 0 (returned; empty on the
        others), and each other process's optimizer state written into the state's staging folder, which rank 0
        then completes and swaps in (trainer/state.py's save_state with staged=True)."""
        weights = self.full_states()
        if self.processes.main:
            state_io.start_staging(state_dir)
        self.processes.barrier()
        if not self.processes.main:
            state_io.save_optimizer_shard(state_io.staging_dir(state_dir) / optimizer_file(self.processes.rank),
                                          optimizer)
        self.processes.barrier()
        return weights

    @property
    def own_optimizer_file(self) -> str | None:
        """This process's optimizer file in a state folder; None for rank 0, whose state is the usual one."""
        return None if self.processes.main else optimizer_file(self.processes.rank)

    def check_state(self, folder: Path) -> None:
        """A sharded state must have every process's optimizer file."""
        size = self.processes.size
        missing = [optimizer_file(r) for r in range(1, size) if not (folder / optimizer_file(r)).exists()]
        if missing:
            raise ConfigError(f"{folder} lacks {', '.join(missing)}: it was not saved by a sharded run on {size} "
                              "processes. Resume it as it was run, or delete the folder to start again.")

    def unshard(self, bundle) -> dict[str, torch.nn.Module]:
        """The trained modules as plain modules again, with the full weights, on rank 0 (the others get nothing
        back: their part of the run is over). Replaces the sharded modules in `bundle`."""
        states = self.full_states()
        if not self.processes.main:
            return {}
        from .models import restore_position_ids  # (CLIP's computed buffer)
        plain = {}
        for name, state in states.items():
            cls, config = self.plain[name]
            with torch.device("meta"):  # transformers' modules take their config object, diffusers' a dict
                module = cls(config) if hasattr(config, "to_dict") else cls.from_config(config)
            module.load_state_dict(state, assign=True)
            restore_position_ids(module)
            setattr(bundle, name, module.train())
            plain[name] = module
        return plain


def _window(param) -> tuple[int, int]:
    """(the whole tensor's size, where this process's shard starts in it, flattened): FSDP shards rows, so a shard
    is a run of consecutive elements."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.numel(), offset[0] * math.prod(param.shape[1:]) if param.dim() else 0


def _recordable_outputs(module: torch.nn.Module):
    """What a transformers (5+) model can output besides its last state, e.g. SDXL's penultimate hidden states.
    transformers looks it up by the model's class name, and FSDP gives the model a class of its own."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers before 5: its models return hidden states themselves
        return None
    return _CAN_RECORD_REGISTRY.get(module) or None


def _keep_recordable_outputs(module: torch.nn.Module, recordable) -> None:
    if recordable is not None:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
        _CAN_RECORD_REGISTRY[module] = recordable  # (registered under the module's new class)


def optimizer_file(rank: int) -> str:
    """The file of one process's optimizer state in a sharded run's state folder (rank 0's is the usual one)."""
    return f"optimizer.rank{rank}.tensors"  # (not *.safetensors: see trainer/state.py)
