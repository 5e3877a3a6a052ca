"""A run as a sequence of phases, each answerable for the GPU memory it uses.

A phase (token probing, class images, photo encoding, training, previews, saving) puts on the device only what it
needs and gives all of it back when it ends, also when it fails: `borrow` lends a module's weights to the device for
the phase (as copies in the phase's dtype; the module's own tensors are put back untouched, so a borrowed fp32 model
is bit-identical afterwards), `place` moves a module there for good (the trained modules) until the phase ends. On
exit the phase frees the cache and reports its peak memory, and an out-of-memory becomes an `OutOfMemory` that names
the phase, what it asked for, what the card has, and what to change.

Watchers (bench/memory_model.py, tests) see every phase and every tensor put on or taken off the device.
"""
from __future__ import annotations

import contextlib
import gc
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .device import GIB, describe

PROBING = "token probing"
CLASS_IMAGES = "class images"
ENCODING = "photo encoding"
TRAINING = "training"
PREVIEWS = "previews"
SAVING = "saving"
SAMPLING = "sampling"  # the sample command: drawing from a finished checkpoint


@dataclass
class PhaseReport:
    name: str
    seconds: float
    peak_allocated: int | None  # torch.cuda.max_memory_allocated over the phase; None off CUDA
    peak_reserved: int | None

    def line(self) -> str:
        """One log line; bench/dreambooth_bench.py reads these back from the command line's output."""
        memory = ("" if self.peak_allocated is None else f", peak {self.peak_allocated / GIB:.2f} GiB allocated / "
                  f"{self.peak_reserved / GIB:.2f} GiB reserved")
        return f"Phase {self.name}: {self.seconds:.1f} s{memory}"


class OutOfMemory(MemoryError):
    """The GPU ran out of memory in a phase; the message says where, how much, and what to change."""

    def __init__(self, phase: str, message: str):
        super().__init__(message)
        self.phase = phase


class Watcher:
    """Override what you need. Tensors are the device-side ones; a tensor can be placed more than once (a trained
    module's weights, borrowed again for previews) and is off the device when it has been released as often."""

    def entered(self, phase: "Phase") -> None: ...

    def placed(self, phase: "Phase", tensors: list[torch.Tensor]) -> None: ...

    def released(self, phase: "Phase", tensors: list[torch.Tensor]) -> None: ...

    def exited(self, phase: "Phase", report: PhaseReport) -> None: ...


_watchers: list[Watcher] = []
_open: list["Phase"] = []  # the phases running now, outermost first


@contextlib.contextmanager
def watching(watcher: Watcher) -> Iterator[Watcher]:
    _watchers.append(watcher)
    try:
        yield watcher
    finally:
        _watchers.remove(watcher)


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


class Phase:
    """with Phase(name, device, log=..., advice=...) as phase: phase.borrow(...); ...

    advice: what to change when this phase runs out of memory (a string, or a function called then).
    host_only: the phase puts nothing on the device (saving); watchers count nothing it allocates."""

    def __init__(self, name: str, device: torch.device, *, log: Callable[[str], None] | None = None,
                 advice: str | Callable[[], str] = "", host_only: bool = False):
        self.name, self.device, self.host_only = name, torch.device(device), host_only
        self._log, self._advice = log, advice
        self._stack = contextlib.ExitStack()
        self._placed: list[torch.nn.Module] = []
        self._cuda = self.device.type == "cuda"
        self._peak_so_far = self._reserved_so_far = 0  # its peaks before a nested phase reset the counters

    def __enter__(self) -> "Phase":
        if self._cuda:
            for outer in _open:
                outer._peak_so_far = max(outer._peak_so_far, torch.cuda.max_memory_allocated(self.device))
                outer._reserved_so_far = max(outer._reserved_so_far, torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        _open.append(self)
        for watcher in _watchers:
            watcher.entered(self)
        self._started = time.monotonic()
        return self

    def borrow(self, *modules: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        """The modules' weights on the device (as `dtype` when given) until the phase ends; then their own tensors
        come back. A module already on the device in that dtype is used as it is, without a copy."""
        for module in modules:
            self._stack.enter_context(borrowed(module, self.device, dtype))

    def place(self, module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        """Move (and cast, when needed) the module to the device in place, until the phase ends."""
        module.to(self.device)
        if next(module.parameters()).dtype != dtype:  # (diffusers warns on every cast, needed or not)
            module.to(dtype=dtype)
        self._placed.append(module)
        self._notify("placed", module_tensors(module))
        return module

    def forget(self, module: torch.nn.Module) -> None:
        """A placed module that is no longer this phase's to move back (something else took it over)."""
        self._placed.remove(module)
        self._notify("released", module_tensors(module))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._stack.close()
            for module in self._placed:
                self._notify("released", module_tensors(module))
                module.to("cpu")
        finally:
            _open.remove(self)
            report = self._finish()
        if self._log is not None and exc_type is None:
            self._log(report.line())
        for watcher in _watchers:
            watcher.exited(self, report)
        if exc is not None and is_out_of_memory(exc):
            raise OutOfMemory(self.name, self._out_of_memory_message(exc, report)) from exc

    def _finish(self) -> PhaseReport:
        if self._cuda or _watchers:  # (a full collection takes a quarter second; the CPU has no cache to empty)
            gc.collect()  # what the phase dropped, reference cycles included, before the cache is emptied
        allocated = reserved = None
        if self._cuda:
            allocated = max(self._peak_so_far, torch.cuda.max_memory_allocated(self.device))
            reserved = max(self._reserved_so_far, torch.cuda.max_memory_reserved(self.device))
            torch.cuda.empty_cache()
            for outer in _open:
                outer._peak_so_far = max(outer._peak_so_far, allocated)
                outer._reserved_so_far = max(outer._reserved_so_far, reserved)
        return PhaseReport(self.name, time.monotonic() - self._started, allocated, reserved)

    def _notify(self, event: str, tensors: list[torch.Tensor]) -> None:
        for watcher in _watchers:
            getattr(watcher, event)(self, tensors)

    def _out_of_memory_message(self, error: BaseException, report: PhaseReport) -> str:
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(error))
        card = ""
        if self._cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            card = (f" The card ({describe(self.device)}) had {free / GIB:.2f} GiB free; this run's peak in this "
                    f"phase was {report.peak_reserved / GIB:.2f} GiB reserved.")
        advice = self._advice() if callable(self._advice) else self._advice
        return (f"Out of GPU memory in the {self.name} phase{f', asking for {asked.group(1)} more' if asked else ''}."
                f"{card} {advice}".strip())


def is_out_of_memory(error: BaseException) -> bool:
    """torch's CUDA OOM, or the same from a library that raises a plain RuntimeError (e.g. a custom kernel)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


@contextlib.contextmanager
def borrowed(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None):
    """The module's weights on `device` (as `dtype` when given) while inside, then its own tensors again, untouched.

    Watchers see the device copies as put on and taken off the device by the innermost running phase."""
    saved_params = [(p, p.data) for p in module.parameters()]
    saved_buffers = [(owner, name, buffer) for owner in module.modules()
                     for name, buffer in owner._buffers.items() if buffer is not None]
    phase = _open[-1] if _open else None
    try:
        with torch.no_grad():
            for param, data in saved_params:
                param.data = _moved(data, device, dtype)
            for owner, name, buffer in saved_buffers:
                owner._buffers[name] = _moved(buffer, device, dtype)
        if phase is not None:  # (a tensor that was on the device already is reported too: watchers count uses)
            phase._notify("placed", module_tensors(module))
        yield module
    finally:
        if phase is not None:
            phase._notify("released", module_tensors(module))
        for param, data in saved_params:
            param.data = data
        for owner, name, buffer in saved_buffers:
            owner._buffers[name] = buffer


def _moved(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(device, dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype)
