"""GPU memory of a DreamBooth training step, measured on the CPU.

There is no GPU here, but what torch.cuda.max_memory_allocated() counts is the bytes of live tensor storage, and
that does not depend on the device: the same tensors are created and freed by the same code. So this runs our loop
(trainer.loop.train) on the CPU under a StorageTracker, a TorchDispatchMode that sees every tensor an aten op
returns, counts each new storage once (views add nothing) and subtracts it when the storage is freed (a weakref
finalizer on the storage), and records the peak and what was live at the peak.

What is counted, i.e. what would be on the GPU during the steps of our loop:
- the trained modules' parameters and buffers (the UNet, and the text encoder with train_text_encoder), which exist
  before tracking starts and are added as a baseline;
- everything aten ops allocate during train(): gradients, optimizer state and the optimizer's temporaries,
  activations and what autograd saves, autocast's bf16 copies of the weights, the cached latents and text embeddings.
Not counted: the frozen VAE and (unless trained) the text encoder, which exist before tracking starts and which our
loop moves off the GPU after caching; memory a kernel takes inside one op without returning it as a tensor (on a GPU:
cuBLAS/cuDNN workspaces); the caching allocator's rounding and fragmentation (max_memory_reserved is more); the CUDA
context (~0.3-0.5 GiB, outside both). The peak is over the training steps only (the caching before them uses less).

    python bench/memory_model.py --help
    python bench/memory_model.py --family sd1 --resolution 512 --settings fp32 bf16+8bit+gc
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from trainer.distributed import join  # noqa: E402
from trainer.phases import Watcher  # noqa: E402
from trainer.sharding import unit_sizes  # noqa: E402

GIB = 2 ** 30
# Categories of live storage, in table order. "weight casts": copies of the weights made by a dtype conversion
# (autocast's bf16 copies for each conv/linear); "optimizer temps": what optimizer.step() allocates and frees.
CATEGORIES = ("weights", "weight casts", "grads", "optimizer state", "optimizer temps", "other")


class _Entry:
    __slots__ = ("nbytes", "tag")

    def __init__(self, nbytes: int, tag: str):
        self.nbytes, self.tag = nbytes, tag


class Window:
    """The peak of live bytes between open_window() and close_window(), and what was live at it (a phase of a run;
    windows may nest, each keeps its own peak)."""

    def __init__(self, live: int, entries: list[_Entry]):
        self.start = self.peak = live
        self.entries = entries
        self.pending = False

    def breakdown(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for entry in self.entries:
            out[entry.tag] = out.get(entry.tag, 0) + entry.nbytes
        return out


def _storage(tensor: torch.Tensor):
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, ... (none in our loop)
        return None


class StorageTracker(TorchDispatchMode):
    """Live bytes of tensor storage allocated while active (plus what `count()` adds), and their peak.

    A storage is new when an op returns it and it is neither one of the op's inputs' storages (views, in-place and
    out= ops) nor one that existed when the tracker started. It leaves the count when it is freed: the Python storage
    object lives exactly as long as the storage (PyTorch preserves it), so a weakref finalizer on it fires then."""

    def __init__(self, shapes_only: bool = False):
        super().__init__()
        self.shapes_only = shapes_only  # inside ShapesOnly: storages are meta (sizes without data), and counted
        self.live = 0
        self.peak = 0
        self.high_water = 0  # the highest live bytes since mark()
        self._entries: dict[int, _Entry] = {}  # StorageImpl address (`_cdata`) -> entry, for live counted storages
        self._ignored: set[int] = set()  # storages that existed at the start and are not counted
        self._tag = "other"  # category of new allocations (see `set_tag`)
        self._peak_entries: list[_Entry] = []
        self._peak_pending = False  # a new peak was reached and not yet snapshotted
        self.peak_at = ""  # the op whose result made the peak, and whether in forward or backward
        self._op = ""
        self._lock = threading.RLock()
        self._windows: list[Window] = []
        self._paused = 0  # > 0: new allocations are not counted (host-only work, e.g. writing a checkpoint)

    # --- what is counted ---------------------------------------------------------------------------------------

    def count(self, tensors, tag: str = "weights") -> None:
        """Count these (pre-existing) tensors' storages from now on, e.g. the trained model's parameters."""
        for tensor in tensors:
            storage = _storage(tensor)
            if storage is not None and storage._cdata not in self._entries:
                self._ignored.discard(storage._cdata)
                self._add(storage, tag)

    def forget(self, tensors) -> None:
        """Stop counting these tensors' storages (e.g. modules that would have left the GPU)."""
        for tensor in tensors:
            storage = _storage(tensor)
            if storage is not None and storage._cdata not in self._ignored:
                self._freed(storage._cdata)
                self._ignored.add(storage._cdata)
                weakref.finalize(storage, self._ignored.discard, storage._cdata).atexit = False

    def retag(self, tensors, tag: str) -> None:
        """Put live counted tensors in a category (entries are shared with the peak snapshot, which follows)."""
        for tensor in tensors:
            storage = _storage(tensor)
            entry = self._entries.get(storage._cdata) if storage is not None else None
            if entry is not None:
                entry.tag = tag

    def set_tag(self, tag: str) -> None:
        """Put new allocations in `tag` from now on (until retagged); "other" is the default."""
        self._tag = tag

    def reset_peak(self) -> None:
        with self._lock:
            self.peak, self.peak_at = self.live, ""
            self._peak_entries = list(self._entries.values())
            self._peak_pending = False

    def open_window(self) -> Window:
        with self._lock:
            window = Window(self.live, list(self._entries.values()))
            self._windows.append(window)
            return window

    def close_window(self, window: Window) -> Window:
        with self._lock:
            if window.pending:
                window.entries, window.pending = list(self._entries.values()), False
            self._windows.remove(window)
            return window

    @contextlib.contextmanager
    def paused(self):
        """New allocations inside are not counted (frees still are)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes per category of what was live at the peak, by the categories the entries have now."""
        with self._lock:
            if self._peak_pending:
                self._snapshot()
            out = dict.fromkeys(CATEGORIES, 0)
            for entry in self._peak_entries:
                out[entry.tag] = out.get(entry.tag, 0) + entry.nbytes
            return out

    def live_breakdown(self) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys(CATEGORIES, 0)
            for entry in self._entries.values():
                out[entry.tag] = out.get(entry.tag, 0) + entry.nbytes
            return out

    # --- the mode ------------------------------------------------------------------------------------------------

    def __enter__(self):
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on some lazy module attributes warns
            warnings.simplefilter("ignore")
            tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
        for tensor in tensors:  # every tensor alive now is on the "before" side: not counted
            storage = _storage(tensor)
            if storage is not None and storage._cdata not in self._entries and storage._cdata not in self._ignored:
                self._ignored.add(storage._cdata)
                weakref.finalize(storage, self._ignored.discard, storage._cdata).atexit = False
        del tensors
        self._watch_storage_resizes()
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._storage_resize
        return super().__exit__(*exc)

    def _watch_storage_resizes(self) -> None:
        """FSDP frees and refills a gathered block's memory with storage.resize_(), which is no op: seen here."""
        self._storage_resize = resize = torch.UntypedStorage.resize_
        tracker = self

        def watched_resize(storage, nbytes):
            out = resize(storage, nbytes)
            entry = tracker._entries.get(storage._cdata)
            if entry is not None and entry.nbytes != storage.nbytes():
                tracker._resize(entry, storage.nbytes())
            return out

        torch.UntypedStorage.resize_ = watched_resize

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.shapes_only and _only_real_inputs(args, kwargs):
            # host-side values (a scheduler's tables and step index, token ids, the photos' pixels) stay real: their
            # results are the real ones, counted as usual
            with torch.utils._python_dispatch._disable_current_modes():
                out = func(*args, **(kwargs or {}))
        elif self.shapes_only and func is torch.ops.aten._local_scalar_dense.default:
            return _no_value(args[0].dtype)  # .item(), .tolist() of a fake tensor: no value to read
        else:
            out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        self._op = func._opname
        inputs = {}
        for arg in tree_flatten((args, kwargs))[0]:
            if isinstance(arg, torch.Tensor):
                storage = _storage(arg)
                if storage is not None:
                    inputs[storage._cdata] = storage
        tag = self._tag
        # torch.tensor(), from_numpy(): a real tensor's storage is made outside any op and lift_fresh returns it;
        # a fake one's is new. Not counted either way (small host-made tables: schedulers', bitsandbytes' code).
        lifted = self.shapes_only and func is torch.ops.aten.lift_fresh.default
        if func is torch.ops.aten._to_copy.default and inputs:
            source = self._entries.get(next(iter(inputs)))
            if source is not None and source.tag == "weights":
                tag = "weight casts"
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = _storage(tensor)
                if storage is None:
                    continue
                entry = self._entries.get(storage._cdata)
                if entry is not None:
                    if entry.nbytes != storage.nbytes():  # resized in place
                        self._resize(entry, storage.nbytes())
                elif storage._cdata not in inputs and storage._cdata not in self._ignored and not lifted:
                    self._add(storage, tag)
        return out

    # --- bookkeeping ---------------------------------------------------------------------------------------------

    def _add(self, storage, tag: str) -> None:
        nbytes = storage.nbytes()
        if nbytes == 0 or (storage.device.type == "meta" and not self.shapes_only):
            return
        with self._lock:
            self._entries[storage._cdata] = _Entry(nbytes, tag)
            self._grow(nbytes)
        weakref.finalize(storage, self._freed, storage._cdata).atexit = False

    def mark(self) -> int:
        """Watch the highest live bytes (high_water) from now on; returns what is live now."""
        self.high_water = self.live
        return self.live

    def _grow(self, nbytes: int) -> None:
        self.live += nbytes
        self.high_water = max(self.high_water, self.live)
        if self.live > self.peak:
            self.peak = self.live
            self._peak_pending = True
            self.peak_at = f"{_phase(self._tag)}: {self._op}"
        for window in self._windows:
            if self.live > window.peak:
                window.peak, window.pending = self.live, True

    def _shrink(self, nbytes: int) -> None:
        if self._peak_pending:  # the first drop after a new peak: this is what the peak was made of
            self._snapshot()
        for window in self._windows:
            if window.pending:
                window.entries, window.pending = list(self._entries.values()), False
        self.live -= nbytes

    def _resize(self, entry: _Entry, nbytes: int) -> None:
        with self._lock:
            if nbytes > entry.nbytes:
                self._grow(nbytes - entry.nbytes)
            else:
                self._shrink(entry.nbytes - nbytes)
            entry.nbytes = nbytes

    def _freed(self, cdata: int) -> None:
        with self._lock:
            entry = self._entries.get(cdata)
            if entry is not None:
                self._shrink(entry.nbytes)  # snapshots first when this ends a peak, with the entry in it
                del self._entries[cdata]

    def _snapshot(self) -> None:
        self._peak_entries = list(self._entries.values())
        self._peak_pending = False


def _only_real_inputs(args, kwargs) -> bool:
    """Tensor inputs, none of them fake (an op with no tensor input, e.g. torch.randn, makes a fake tensor)."""
    from torch._subclasses.fake_tensor import FakeTensor
    tensors = [arg for arg in tree_flatten((args, kwargs))[0] if isinstance(arg, torch.Tensor)]
    return bool(tensors) and not any(isinstance(tensor, FakeTensor) for tensor in tensors)


def _no_value(dtype: torch.dtype):
    """What .item() reads from a tensor without data: False, or 1 (a step count; 0 would divide by zero in AdamW's
    bias correction)."""
    return False if dtype == torch.bool else 1.0 if dtype.is_floating_point or dtype.is_complex else 1


def _phase(tag: str) -> str:
    """Where the step is: "forward" (anything outside backward and the optimizer), "backward", "optimizer step"."""
    in_backward = torch._C._current_graph_task_id() != -1
    if tag == "optimizer temps":
        return "backward, optimizer step" if in_backward else "optimizer step"
    return "backward" if in_backward else "forward"


# ----------------------------------------------------------------------------------------------------------------------
# CUDA's choices on the CPU: where PyTorch decides by device, make the CPU decide as CUDA does
# ----------------------------------------------------------------------------------------------------------------------

# Ops that CUDA autocast runs in float32 (policy "fp32": lower-precision inputs are cast up, the output is float32)
# while CPU autocast runs them in the input's dtype. These are the ones SD's UNet and CLIP call; the rest of CUDA's
# fp32 list (pow, exp, softmax, losses, ...) is not called on bf16 tensors under autocast in our step.
CUDA_FP32_OPS = ("group_norm", "layer_norm")


@contextlib.contextmanager
def cuda_autocast_policy():
    """While inside, CPU autocast treats CUDA_FP32_OPS as CUDA autocast does, so activations get CUDA's dtypes."""
    library = torch.library.Library("aten", "IMPL")
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def up(value):
        return value.float() if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16) \
            else value

    def fp32_kernel(op):
        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return op(*map(up, args), **{key: up(value) for key, value in kwargs.items()})
        return kernel

    for name in CUDA_FP32_OPS:
        library.impl(name, fp32_kernel(getattr(torch.ops.aten, name).default), "AutocastCPU")
    try:
        yield
    finally:
        library._destroy()


@contextlib.contextmanager
def cuda_foreach_default():
    """While inside, torch.optim's optimizers default to their foreach implementation on the CPU, as they do on CUDA.
    (AdamW's foreach step makes a temporary the size of all its moments, e.g. sqrt(exp_avg_sq); its per-tensor loop,
    the CPU's default, one tensor's worth.) An explicit foreach=False, as fused_backward passes, still holds."""
    import torch.optim.optimizer as optimizer_module
    supported = optimizer_module._get_foreach_kernels_supported_devices
    optimizer_module._get_foreach_kernels_supported_devices = lambda: [*supported(), "cpu"]
    try:
        yield
    finally:
        optimizer_module._get_foreach_kernels_supported_devices = supported


@contextlib.contextmanager
def cuda_defaults(enabled: bool = True):
    with contextlib.ExitStack() as stack:
        if enabled:
            stack.enter_context(cuda_autocast_policy())
            stack.enter_context(cuda_foreach_default())
        yield


# ----------------------------------------------------------------------------------------------------------------------
# Shapes only: the same run on tensors that have sizes and no data (a full-size SDXL at 1024 px in seconds)
# ----------------------------------------------------------------------------------------------------------------------


class ShapesOnly:
    """While inside, tensors are torch's FakeTensors: every op computes its result's size, dtype and strides (with the
    op's meta kernel) and allocates nothing; each result has a (meta) storage of the bytes the real one would have,
    created and freed at the same moments, since the same Python code holds the same references. So the tracker
    counts the same storages as on real tensors, without the compute or the RAM; what differs is only what depends on
    values: .item() and .tolist() read 1 or False (the loop's loss check, the token prober's scores). Checked against real runs
    byte for byte (tests/test_memory_model.py).

        with ShapesOnly() as shapes:
            bundle = random_bundle("sdxl", small=False)
        result = measure(bundle, ...)  # sees the bundle's tensors are fake, and runs in `shapes` itself

    Module.to() converts fake parameters as it does real CPU ones: `param.data = converted` (torch's own code swaps
    fake ones instead, which refuses a parameter that has hooks or other references, as a training run's have)."""

    def __init__(self):
        from torch._subclasses.fake_tensor import FakeTensorMode
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "ShapesOnly":
        self._stack.enter_context(self.mode)
        self._stack.enter_context(as_for_real_tensors())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)


@contextlib.contextmanager
def as_for_real_tensors():
    """While inside, fake tensors go where real ones go:
    - Module._apply (behind .to(), .float(), ...) does for every tensor what torch does for real CPU tensors: the
      parameter keeps its identity and gets the converted tensor as its .data, its gradient too; buffers are replaced
      (a meta parameter made fake by to_empty() is replaced too);
    - Tensor.numpy() gives zeros of the shape (a generated image comes out black, and is saved as a PNG)."""
    from torch._subclasses.fake_tensor import FakeTensor
    original, original_numpy = torch.nn.Module._apply, torch.Tensor.numpy

    def numpy_(self, *, force=False):
        if isinstance(self, FakeTensor):
            with real_tensors():
                return torch.zeros(self.shape, dtype=self.dtype).numpy()
        return original_numpy(self, force=force)

    def _apply(self, fn, recurse=True):
        if recurse:
            for module in self.children():
                module._apply(fn)
        for key, param in self._parameters.items():
            if param is None:
                continue
            with torch.no_grad():
                applied = fn(param)
                if not torch._has_compatible_shallow_copy_type(param, applied):  # meta -> fake: a new parameter
                    self._parameters[key] = torch.nn.Parameter(applied, requires_grad=param.requires_grad)
                    continue
                param.data = applied
                if param.grad is not None:
                    param.grad.data = fn(param.grad)
        for key, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[key] = fn(buffer)
        return self

    torch.nn.Module._apply, torch.Tensor.numpy = _apply, numpy_
    try:
        yield
    finally:
        torch.nn.Module._apply, torch.Tensor.numpy = original, original_numpy


def fake_mode_of(bundle):
    """The FakeTensorMode the bundle's tensors belong to, or None for real tensors."""
    from torch._subclasses.fake_tensor import FakeTensor
    weight = next(bundle.unet.parameters())
    return weight.fake_mode if isinstance(weight, FakeTensor) else None


def real_tensors():
    """Inside ShapesOnly: real tensors again while inside (the input images, made from real random bytes)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    return unset_fake_temporarily()


# ----------------------------------------------------------------------------------------------------------------------
# One training run of our loop under the tracker
# ----------------------------------------------------------------------------------------------------------------------


class _StopAfterLastStep(Exception):
    """Raised from the last step's callback: nothing after the steps (saving the output) is measured."""


def optimizers_of(optimizer) -> list:
    return list(getattr(optimizer, "optimizers", [optimizer]))  # FusedBackward: one optimizer per tensor


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """The moments etc. of every tensor, and tensors the optimizer object holds itself (bf16_weights' fp32 scratch)."""
    held = [value for value in vars(optimizer).values() if isinstance(value, torch.Tensor)]
    return held + [value for opt in optimizers_of(optimizer) for state in opt.state.values()
                   for value in state.values() if isinstance(value, torch.Tensor)]


def trained_text_encoders(bundle) -> tuple:
    """The text encoders train_text_encoder trains: all of them (SDXL's two)."""
    return tuple(getattr(bundle, "text_encoders", None) or (bundle.text_encoder,))


class PhaseMeter(Watcher):
    """Each phase of a run as a window of the tracker; what a phase puts on the device counts as there until it is
    taken off (on the CPU nothing moves, so the tracker is told)."""

    def __init__(self, tracker: StorageTracker):
        self.tracker = tracker
        self.phases: list[dict] = []
        self._uses: dict[int, int] = {}  # storage -> how many placements have not been released yet
        self._open: dict[int, tuple[Window, contextlib.ExitStack, dict]] = {}

    def entered(self, phase) -> None:
        stack = contextlib.ExitStack()
        if phase.host_only:
            stack.enter_context(self.tracker.paused())
        self.phases.append({"phase": phase.name})  # in the order they start; filled in when it ends
        self._open[id(phase)] = (self.tracker.open_window(), stack, self.phases[-1])

    def placed(self, phase, tensors) -> None:
        for tensor in tensors:
            key = tensor.untyped_storage()._cdata
            self._uses[key] = self._uses.get(key, 0) + 1
        self.tracker.count(tensors, "weights")
        self.tracker.retag(tensors, "weights")

    def released(self, phase, tensors) -> None:
        gone = []
        for tensor in tensors:
            key = tensor.untyped_storage()._cdata
            self._uses[key] = self._uses.get(key, 1) - 1
            if self._uses[key] <= 0:
                del self._uses[key]
                gone.append(tensor)
        self.tracker.forget(gone)

    def exited(self, phase, report) -> None:
        window, stack, record = self._open.pop(id(phase))
        stack.close()
        self.tracker.close_window(window)
        gc.collect()
        record.update(peak=window.peak, live_at_start=window.start, live_at_end=self.tracker.live,
                      peak_breakdown=window.breakdown(), time_s=report.seconds)


def measure(bundle, config: dict, steps: int = 2, resolution: int | None = None, num_images: int = 2,
            cuda_like: bool = True, autocast_cache: bool = False, gpu_memory: int | None = None,
            whole_run: bool = False) -> dict:
    """Train `bundle` (in place) for `steps` steps with TrainConfig(**config) under a StorageTracker; per step: the
    peak live bytes, the breakdown at the peak, the live bytes at its start and its wall time; per phase of the run
    (trainer/phases.py): its peak, what was live at its start and end, and the breakdown at its peak.

    cuda_like: CPU autocast and AdamW choose as on CUDA (cuda_defaults). gpu_memory: every choice of the engine (presets,
    precisions, optimizer kernels) is made as on a GPU with bf16 and this many bytes (trainer.device.emulating_gpu).
    whole_run: the whole run as a user's, every phase: token probing, `num_images` class images generated (one sampling
    step: the peak does not depend on their number), photo encoding, training, a preview (one step) and saving; without
    it, ready class images and no previews (the training step alone). autocast_cache=True is an experiment: the
    training step's autocast with its cache of weight casts, which the loop turns off (see trainer.loop._autocast)."""
    import trainer.loop as loop
    from PIL import Image
    from trainer import phases
    from trainer.api import probe_identifiers
    from trainer.callbacks import Callbacks
    from trainer.config import TrainConfig
    from trainer.dataset import SubjectImage
    from trainer.device import emulating_gpu

    workdir = tempfile.mkdtemp(prefix="memory_model_")
    run = {"prior_cache_dir": f"{workdir}/priors", "prior_steps": 1, "sample_prompts": ["a zwx dog on the beach"],
           "sample_steps": 1} if whole_run else {}
    cfg = TrainConfig(**{"base_model": "random", "identifier": "zwx", "class_noun": "dog", "device": "cpu",
                         "output": f"{workdir}/out.safetensors", "resume": False, "with_prior_preservation": True,
                         "num_class_images": num_images, "batch_size": 1, **run, **config, "max_train_steps": steps,
                         **({"resolution": resolution} if resolution else {})})
    generator = torch.Generator().manual_seed(0)

    fake_mode = fake_mode_of(bundle)

    def images(prefix):  # tiny noise images: the loop resizes them to cfg.resolution before encoding
        with real_tensors() if fake_mode else contextlib.nullcontext():
            return [SubjectImage(f"{prefix}{i}.png", Image.frombytes(
                "RGB", (64, 64), torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8).numpy()))
                for i in range(num_images)]

    trained = [bundle.unet] + (list(trained_text_encoders(bundle)) if cfg.train_text_encoder else [])
    params = [p for m in trained for p in m.parameters()]
    parallel = join().parallel  # under a launcher: this process's share of a data-parallel (or sharded) run
    sizes = [unit_sizes(m) for m in trained]  # what sharding gathers at once (see sharded_peak)
    units = {"largest": max(max(s[:-1], default=0) for s in sizes), "roots": sum(s[-1] for s in sizes),
             "bytes_per_weight": params[0].element_size() if not cfg.bf16_weights else 2,
             "largest_tensor": max(p.numel() for p in params)}
    tracker, found = StorageTracker(shapes_only=fake_mode is not None), {}
    meter = PhaseMeter(tracker)

    def weights():  # (sharded: this process's pieces)
        return [local_tensor(t) for m in trained for t in (*m.parameters(), *m.buffers())]

    def tag_grad(param):  # runs before fused_backward's own hook (registered earlier), while the grad exists
        tracker.retag([param.grad], "grads")

    make_optimizer = loop.make_optimizer

    def tracked_make_optimizer(*args, **kwargs):  # find the optimizer; its step()'s allocations are "optimizer temps"
        optimizer = make_optimizer(*args, **kwargs)
        found["optimizer"] = weakref.ref(optimizer)  # (a strong one would keep its state alive after training)
        for opt in optimizers_of(optimizer):
            opt.register_step_pre_hook(before_optimizer_step)
            opt.register_step_post_hook(after_optimizer_step)
        tracker.retag(optimizer_state_tensors(optimizer), "optimizer state")  # bf16_weights' scratch
        return optimizer

    def before_optimizer_step(opt, args, kwargs) -> None:  # (a hook's return value would replace the arguments)
        records[-1].setdefault("peak_before_optimizer", tracker.peak)  # forward and backward (without fused_backward)
        records[-1].setdefault("breakdown_before_optimizer", tracker.peak_breakdown())
        tracker.set_tag("optimizer temps")
        found["live_before_optimizer"] = tracker.mark()

    def after_optimizer_step(opt, args, kwargs) -> None:
        tracker.set_tag("other")
        # what one optimizer step (fused_backward: one tensor's) adds at most: its temporaries, a new state
        rise = tracker.high_water - found["live_before_optimizer"]
        records[-1]["optimizer_rise"] = max(records[-1].get("optimizer_rise", 0), rise)
        tracker.retag(optimizer_state_tensors(opt), "optimizer state")

    records = []

    class Probe(Callbacks):
        def should_stop(self):  # called before every step (and between class images: those records stay unfinished)
            tracker.retag(weights(), "weights")
            gc.collect()
            tracker.reset_peak()
            records.append({"live_at_start": tracker.live, "start_breakdown": tracker.live_breakdown(),
                            "t0": time.perf_counter()})
            return False

        def on_step(self, info):
            record = records[-1]
            record["time_s"] = time.perf_counter() - record.pop("t0")
            tracker.retag(weights(), "weights")
            tracker.retag(optimizer_state_tensors(found["optimizer"]()), "optimizer state")
            record.update(step=info.step, peak=tracker.peak, peak_at=tracker.peak_at,
                          peak_breakdown=tracker.peak_breakdown())
            if info.step == steps and not whole_run and not parallel:  # (the other processes would wait for it)
                raise _StopAfterLastStep

    instance_images = images("i")
    class_images = None if whole_run else images("c")
    # (Sharded: FSDP replaces the parameters, so their hooks would not run, and holding them would keep the full
    # weights alive beside the shards.)
    handles = [] if parallel else [p.register_post_accumulate_grad_hook(tag_grad) for p in params if p.requires_grad]
    trained_params = sum(p.numel() for p in params)
    del params
    loop.make_optimizer = tracked_make_optimizer
    autocast = loop._autocast
    if autocast_cache:
        loop._autocast = lambda device, precision, cache_casts=True: autocast(device, precision)
    emulation = emulating_gpu(gpu_memory) if gpu_memory else contextlib.nullcontext()
    to_host, save_output = loop.to_host, loop._save_output
    if fake_mode is not None:
        loop.to_host = lambda *values: [0.0] * len(values)  # the loss has no value to read (the loop checks it)
        loop._save_output = lambda *args: None  # no bytes to write (a host-only phase: it counts nothing anyway)
    try:
        with cuda_defaults(cuda_like), emulation, fake_mode or contextlib.nullcontext(), \
                as_for_real_tensors() if fake_mode else contextlib.nullcontext(), phases.watching(meter), \
                tracker:
            if whole_run:
                probe_identifiers(bundle, cfg.class_noun, candidates=4, shortlist=2, seed=0,
                                  device=torch.device("cpu"))
            loop.train(cfg, bundle=bundle, callbacks=Probe(), instance_images=instance_images,
                       class_images=class_images)
            gc.collect()
            left_on_device = tracker.live
    except _StopAfterLastStep:
        left_on_device = None
    finally:
        loop.make_optimizer, loop._autocast = make_optimizer, autocast
        loop.to_host, loop._save_output = to_host, save_output
        for handle in handles:
            handle.remove()
        shutil.rmtree(workdir, ignore_errors=True)  # (the output and class images: 2 GB at full size)
    records = [record for record in records if "step" in record]  # (none but rank 0's: the others keep quiet)
    return {"config": config, "resolution": cfg.resolution, "cuda_like": cuda_like,
            "autocast_cache": autocast_cache, "gpu_memory": gpu_memory, "trained_params": trained_params,
            "steps": records, "peak": max((r["peak"] for r in records), default=0), "phases": meter.phases,
            "left_on_device": left_on_device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "units": units, "processes": join().size}


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's piece in this process (a DTensor's local tensor); any other tensor itself."""
    from torch.distributed.tensor import DTensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# The categories sharding divides by the number of processes (trainer/sharding.py); the rest (activations, what
# autograd saves, autocast's weight casts, cached latents) is each process's own, as in one process.
SHARDED = ("weights", "grads", "optimizer state", "optimizer temps")


def sharded_peak(result: dict, processes: int) -> int:
    """Each process's peak when the measured step is sharded across `processes` (FSDP, trainer/sharding.py), from the
    one-process measurement.

    What FSDP holds in full beyond a process's shards, in the weights' dtype: in the middle of the backward pass, each
    module's root unit (weights outside the sharded blocks: embeddings, in/out convolutions), the block running and
    the next one fetched ahead, the running block's full gradients and the copy of them that is reduce-scattered;
    at its end, when FSDP reduces the roots, their full weights, full gradients, that copy and its shard.

    Without fused_backward each step has three peaks. In the optimizer's step: the sharded categories divided by
    `processes`, the rest as it was. In forward/backward: the same, plus every gradient's shard (FSDP's peak comes
    later in the backward pass than one process's, as each block's gradient leaves it reduce-scattered: counting all
    of them is the upper bound), plus what FSDP holds in full. At the end of the backward pass: every gradient's
    shard, what is kept between steps, and the roots being reduced. With fused_backward (Shards.stepping_in_backward)
    there is no optimizer step after the backward pass, and of the gradients' shards only two units' exist at once
    (one waiting to be stepped, one arriving): the one-process peak divided, plus what FSDP holds in full.

    An upper bound: sharded runs measured on the CPU (the small models, N = 2 and 4, eight settings, with and without
    fused_backward) came 2-48% under it; tests/test_memory_model.py holds three of them to it."""
    if processes == 1:
        return result["peak"]
    units, bytes_per_weight = result["units"], result["units"]["bytes_per_weight"]
    gathered = bytes_per_weight * (units["roots"] + 4 * units["largest"])
    roots_reduced = bytes_per_weight * (3 * units["roots"] + units["roots"] // processes)
    all_grads = bytes_per_weight * result["trained_params"]
    # bf16 weights: the random bits of the largest whole tensor (trainer/fused.py's window), all along; one process
    # draws them into its gradient scratch, which is counted, and divided, with the optimizer's state.
    draws = 4 * units["largest_tensor"] if result["config"].get("bf16_weights") else 0

    def divided(peak: int, breakdown: dict) -> int:
        sharded = sum(breakdown[c] for c in SHARDED)
        return peak - sharded + sharded // processes + draws

    if result["config"].get("fused_backward"):  # (the roots' shards are stepped while FSDP reduces them)
        pending = 2 * bytes_per_weight * units["largest"] // processes
        return max(max(divided(s["peak"], s["peak_breakdown"]) + gathered,
                       divided(s["live_at_start"], s["start_breakdown"]) + roots_reduced
                       + s["optimizer_rise"] // processes) + pending
                   for s in result["steps"])

    def backward(step: dict) -> int:
        breakdown = step["breakdown_before_optimizer"]
        later_grads = (all_grads - breakdown["grads"]) // processes
        return divided(step["peak_before_optimizer"], breakdown) + later_grads + gathered

    def end_of_backward(step: dict) -> int:
        breakdown = step["peak_breakdown"]  # (at the optimizer's step: the activations are gone)
        rest = step["peak"] - sum(breakdown[c] for c in SHARDED)
        held = breakdown["weights"] + breakdown["optimizer state"] + all_grads
        return rest + held // processes + roots_reduced + draws

    return max(max(divided(s["peak"], s["peak_breakdown"]), backward(s), end_of_backward(s))
               for s in result["steps"])


# ----------------------------------------------------------------------------------------------------------------------
# Command line: one subprocess per setting, a markdown table
# ----------------------------------------------------------------------------------------------------------------------


def default_settings() -> list[str]:
    lean = "bf16+8bit+gc+fused_backward+bf16_weights"  # the "8 GB" preset on a GPU with bf16
    # (not fp32 + AdamW without checkpointing: at full size its run needs more than 24 GB of RAM)
    return ["bf16+8bit+gc", "bf16+8bit+gc+fused_backward", lean, lean + "+te"]


# What the caching allocator reserves over what is allocated (max_memory_reserved / max_memory_allocated), taken
# generously: on an H200 (torch 2.11) the ratio was 1.03-1.04 for every setting measured (issue 10's table); plus
# cuBLAS/cuDNN workspaces, which are in neither the tracker's count nor the CUDA context.
RESERVED_OVER_ALLOCATED = 1.10
WORKSPACES = 0.1 * GIB


def estimated_reserved(allocated: int) -> int:
    """What torch.cuda.max_memory_reserved() would show for this allocated peak: what decides an out-of-memory."""
    return int(allocated * RESERVED_OVER_ALLOCATED + WORKSPACES)


def run_one(args: argparse.Namespace, setting: str, resolution: int) -> dict:
    from bench.dreambooth_bench import parse_setting
    from bench.models import random_bundle
    gpu_memory = int(args.gpu_memory * GIB) if args.gpu_memory else None
    with ShapesOnly() if args.shapes_only else contextlib.nullcontext():
        bundle = random_bundle(args.family, args.small)
    result = measure(bundle, parse_setting(setting).ours, steps=args.steps,
                     resolution=resolution, cuda_like=not args.cpu_defaults, autocast_cache=args.autocast_cache,
                     gpu_memory=gpu_memory, whole_run=args.whole_run, num_images=4 if args.whole_run else 2)
    return {**result, "family": args.family, "small": args.small, "shapes_only": args.shapes_only, "setting": setting}


def phase_markdown(results: list[dict], unit: str = "GiB") -> str:
    """One row per phase of each whole run: its peak (and the reserved memory that implies), and what it found and
    left on the device."""
    scale = {"GiB": GIB, "MiB": 2 ** 20}[unit]
    header = ["setting", "phase", f"peak {unit}", f"est. reserved {unit}", f"live at start {unit}",
              f"live at end {unit}", *(f"{c} at peak {unit}" for c in CATEGORIES), "CPU s"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for r in results:
        for phase in r.get("phases", []):
            cells = [r["setting"], phase["phase"], f"{phase['peak'] / scale:.2f}",
                     f"{estimated_reserved(phase['peak']) / scale:.2f}", f"{phase['live_at_start'] / scale:.2f}",
                     f"{phase['live_at_end'] / scale:.2f}",
                     *(f"{phase['peak_breakdown'][c] / scale:.2f}" for c in CATEGORIES), f"{phase['time_s']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: list[dict], unit: str = "GiB") -> str:
    scale = {"GiB": GIB, "MiB": 2 ** 20}[unit]
    header = ["setting", f"peak {unit}", *(f"{c} {unit}" for c in CATEGORIES), f"fwd+bwd peak {unit}",
              f"live between steps {unit}", "CPU s/step", "peak in"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['setting']} | failed: {r['error']} |")
            continue
        worst = max(r["steps"], key=lambda s: s["peak"])
        last = r["steps"][-1]
        cells = [r["setting"], f"{r['peak'] / scale:.2f}",
                 *(f"{worst['peak_breakdown'][c] / scale:.2f}" for c in CATEGORIES),
                 "—" if r["config"].get("fused_backward") else f"{last['peak_before_optimizer'] / scale:.2f}",
                 f"{last['live_at_start'] / scale:.2f}", f"{last['time_s']:.1f}",
                 f"step {worst['step']}, {worst.get('peak_at', '?')}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sharded_markdown(results: list[dict], processes: list[int], unit: str = "GiB") -> str:
    """Each setting's per-GPU peak sharded across N processes (sharded_peak: projected from the one-process run, an
    upper bound), with the reserved memory it implies."""
    scale = {"GiB": GIB, "MiB": 2 ** 20}[unit]
    header = ["setting", *(f"N={n}: peak / est. reserved {unit}" for n in processes)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(processes)]
    for r in results:
        if "error" in r:
            continue
        cells = [r["setting"]]
        for n in processes:
            peak = sharded_peak(r, n)
            cells.append(f"{peak / scale:.2f} / {estimated_reserved(peak) / scale:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def theory(results: list[dict], unit: str = "GiB") -> str:
    scale = {"GiB": GIB, "MiB": 2 ** 20}[unit]
    lines = []
    for n in sorted({r["trained_params"] for r in results if "trained_params" in r}):
        lines.append(f"- {n / 1e6:.1f}M trained parameters: fp32 weights {4 * n / scale:.2f} {unit}, fp32 grads "
                     f"{4 * n / scale:.2f} {unit}, AdamW state {8 * n / scale:.2f} {unit}, 8-bit AdamW state about "
                     f"{2 * n / scale:.2f} {unit} (2 B/parameter + block scales).")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peak live tensor memory (what torch.cuda.max_memory_allocated counts, less allocator rounding, "
                    "kernel workspaces and the CUDA context) of our DreamBooth training step, measured on the CPU, "
                    "per setting, as a markdown table. Batch 1 + 1 class image, random full-size weights.",
        epilog="Settings are '+'-joined parts as in bench/dreambooth_bench.py (fp32, bf16, adamw, 8bit, gc, te, and "
               "every TrainConfig boolean by name, e.g. fused_backward); all start from fp32 + AdamW. "
               f"Default: {' '.join(default_settings())}.")
    parser.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1")
    parser.add_argument("--shapes-only", action="store_true",
                        help="tensors with sizes and no data (torch's FakeTensor): the same storages counted, in "
                             "seconds and without the RAM (ShapesOnly; how the SDXL figures are made)")
    parser.add_argument("--small", action="store_true", help="the tiny models (bench/models.py), to try it out")
    parser.add_argument("--resolution", type=int, help="training size in px (default 512; 64 with --small)")
    parser.add_argument("--settings", nargs="+", help="settings to measure (default: see below)")
    parser.add_argument("--steps", type=int, default=2, help="steps per run (the peak is over all; default 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-defaults", action="store_true",
                        help="keep the CPU's own choices (autocast runs group_norm/layer_norm in bf16, AdamW steps "
                             "one tensor at a time) instead of CUDA's (fp32 norms, AdamW's foreach step)")
    parser.add_argument("--autocast-cache", action="store_true",
                        help="experiment: the training step's autocast with its cache of bf16 weight copies, "
                             "which the loop turns off: shows what the cache would cost")
    parser.add_argument("--whole-run", action="store_true",
                        help="every phase of a run, as a user's: token probing, class images (generated), photo "
                             "encoding, training, a preview, saving; a table row per phase")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="decide everything as on a GPU with bf16 and this much memory, e.g. 7.6 for an 8 GB card "
                             "(presets, precisions, the optimizer's kernels); default: as on this CPU")
    parser.add_argument("--processes", type=int, nargs="+", metavar="N",
                        help="also each GPU's peak with the run sharded across N processes (--shard: FSDP), "
                             "projected from the one-process measurement (an upper bound), e.g. --processes 1 2 4")
    parser.add_argument("--out", action="append", default=[], help="write the table (.md) or all (.json)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one setting, print JSON
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    resolution = args.resolution or (64 if args.small else 1024 if args.family == "sdxl" else 512)
    if args.one:
        result = run_one(args, args.one, resolution)
        if join().main:  # (under a launcher: rank 0 speaks for its run)
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    flags = [flag for flag, on in (("--small", args.small), ("--cpu-defaults", args.cpu_defaults),
                                   ("--autocast-cache", args.autocast_cache), ("--whole-run", args.whole_run),
                                   ("--shapes-only", args.shapes_only)) if on]
    passed_on = ["--family", args.family, "--resolution", str(resolution), "--steps", str(args.steps), *flags,
                 *(["--threads", str(args.threads)] if args.threads else []),
                 *(["--gpu-memory", str(args.gpu_memory)] if args.gpu_memory else [])]
    results = []
    for setting in args.settings or default_settings():
        print(f"[{args.family} {resolution}px {setting}]", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, *passed_on, "--one", setting], capture_output=True, text=True)
        found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            results.append({"setting": setting, "error": f"exit {proc.returncode}: {tail}"})
        else:
            results.append(json.loads(found[0]))
            phases = ", ".join(f"{p['phase']} {p['peak'] / GIB:.2f}" for p in results[-1]["phases"])
            print(f"    training step peak {results[-1]['peak'] / GIB:.2f} GiB; phases (GiB): {phases}",
                  file=sys.stderr, flush=True)
    unit = "MiB" if args.small else "GiB"
    policy = "the CPU's own autocast and AdamW choices" if args.cpu_defaults else "CUDA's autocast and AdamW choices"
    title = {"sd1": "SD1.5", "sd2": "SD2.1", "sdxl": "SDXL"}[args.family]
    table = (f"{title}{' (small)' if args.small else ''}{' (shapes only)' if args.shapes_only else ''}, {resolution} px, "
             f"batch 1 + 1 class image, {args.steps} steps, peak over all steps; {policy}"
             f"{', autocast cache on' if args.autocast_cache else ''}"
             f"{f', decided as on a {args.gpu_memory} GiB GPU with bf16' if args.gpu_memory else ''} "
             f"(torch {torch.__version__}, CPU)\n\n"
             + markdown(results, unit) + "\n\n" + theory(results, unit) + "\n"
             + (f"\nPhases of the whole run:\n\n{phase_markdown(results, unit)}\n" if args.whole_run else "")
             + (f"\nEach GPU's training step sharded across N processes (projected, an upper bound):\n\n"
                f"{sharded_markdown(results, args.processes, unit)}\n" if args.processes else ""))
    print(table)
    for path in map(Path, args.out):
        path.write_text(json.dumps(results, indent=1) if path.suffix == ".json" else table)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
