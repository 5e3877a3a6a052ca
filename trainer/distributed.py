"""Data parallel across the processes that `accelerate launch` (or torchrun) starts, one per GPU.

The launcher tells each process its place (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Every process draws the
same seeded stream for the whole global batch (N processes x batch_size) and trains on its own share of it; the
gradients are averaged, weighted by each share's size, before the optimizer step, so that N processes learn what one
process with the global batch and the same draws would, up to float rounding. One process (rank 0) writes the class
images, states, the output and the log; the others wait for it where it matters.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    sharded: bool = False  # trainer/sharding.py: weights, gradients and optimizer state split across the processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """Each process its own GPU (LOCAL_RANK); on the CPU they share it."""
        return torch.device("cuda", self.local_rank) if self.parallel and device.type == "cuda" else device

    def share(self, global_batch: list[int], batch_size: int) -> slice:
        """This process's part of the global batch's rows (an epoch's last batch may leave it fewer, or none)."""
        start = min(self.rank * batch_size, len(global_batch))
        return slice(start, min(start + batch_size, len(global_batch)))

    def average_gradients(self, params: list[torch.nn.Parameter], local: int, total: int) -> None:
        """Each gradient becomes the global batch's: the processes' gradients of their own mean loss, weighted by
        their share of the batch, summed."""
        if not self.parallel:
            return
        bucket: list[torch.Tensor] = []
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad.mul_(local / total)
            bucket.append(param.grad)
            if sum(g.numel() for g in bucket) >= BUCKET_ELEMENTS or param is params[-1]:
                _all_reduce_together(bucket)
                bucket = []

    def totals(self, *values: float) -> list[float]:
        """Each value summed over the processes, in one collective."""
        if not self.parallel:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when one of them says so (a stop asked for on one stops all at the same step)."""
        return self.totals(1.0 if flag else 0.0)[0] > 0

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()

    def collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


BUCKET_ELEMENTS = 2**24  # gradients summed 64 MiB (fp32) at a time: few collectives, little extra memory


def _all_reduce_together(grads: list[torch.Tensor]) -> None:
    """One collective for several gradients of one dtype (one per dtype otherwise)."""
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


SINGLE = Processes()


def join() -> Processes:
    """This process's place among those the launcher started; SINGLE when it started only this one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
