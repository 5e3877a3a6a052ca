"""What one training step asks of the host, per setting, counted on the CPU (issue 10 point 4: profile first).

On a GPU the host only queues work: every ATen call that is not a view launches a kernel (a few microseconds of the
host's time each), and every host sync (.item(), .tolist(), bool() of a tensor, an op whose output size depends on
the data, torch.cuda.synchronize(), bitsandbytes' wait after each tensor it steps) empties the GPU's queue. Once the
host's time for a step nears the GPU's, the GPU waits for Python. So this runs a few steps of the real train() and
counts, per step: the kernels it would launch, the host syncs (by kind), and the CPU's milliseconds (the median of
a second run's steps, without the counting).

The model is "slim SD 1.5" (bench.models.slim_configs): every tensor SD 1.5 trains (686 in the UNet, 196 in the text
encoder) at a fortieth of the width, so the counts are the full model's and the time is mostly the host's overhead
(not all: the text encoder's token embedding keeps its 49408 rows). Settings are named as in
bench/dreambooth_bench.py; presets resolve as on a GPU with bf16 and the optimizers take their GPU paths
(trainer.device.emulating_gpu, bench.memory_model.cuda_defaults).

    python bench/step_profile.py [--settings bf16+8bit+gc 8GB 12GB 24GB ...] [--steps 5]

On a GPU, `--gpu` profiles one step per setting of the full-size random SD 1.5 at 512 px with torch.profiler instead:
how much of the step the GPU was busy, the kernels launched and the host's waits (bash bench/gpu_check.sh profile).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.dreambooth_bench import NATIVE_RESOLUTION, parse_setting  # noqa: E402 (after the path above)
from bench.memory_model import cuda_defaults  # noqa: E402
from bench.models import noise_images, random_bundle, slim_configs  # noqa: E402
from trainer.callbacks import Callbacks  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.dataset import SubjectImage  # noqa: E402
from trainer.device import emulating_gpu  # noqa: E402
from trainer.loop import train  # noqa: E402

DEFAULT_SETTINGS = ("bf16+8bit+gc", "8GB", "12GB", "24GB", "bf16+8bit+gc+te", "8GB+te")
# torch.profiler's names for a kernel launch, and for the host waiting for the GPU (cudaMemcpy, not Async, waits too).
LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"}
WAITS = {"cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
# Ops whose output's size depends on the values: a GPU must finish them before the host knows the size.
DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim"}
# Where .tolist() reads a tensor that is on the host on a GPU too: the run's seeded CPU stream (trainer/randomness.py).
HOST_TENSOR_CALLERS = (str(REPO_ROOT / "trainer" / "randomness.py"),)


class Counter(TorchDispatchMode):
    """Counts, while inside, the kernels a GPU would launch (ATen calls other than views) by op, and the host syncs by
    kind: .item() and bool() (aten._local_scalar_dense), .tolist(), data-dependent sizes, torch.cuda.synchronize()
    and bitsandbytes' sync_gpu (bitsandbytes calls it after every tensor; on a CPU it returns without waiting, so it
    is counted by name)."""

    def __init__(self):
        super().__init__()
        self.kernels: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self._patches: list[tuple[object, str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.syncs[".item()"] += 1
        elif name in DATA_DEPENDENT:
            self.syncs[f"data-dependent {name}"] += 1
        elif not func.is_view and func.namespace != "profiler":  # (torch.optim's record_function marks)
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))

    def _count_calls(self, owner: object, attribute: str, kind: str) -> None:
        original = getattr(owner, attribute)

        def counted(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename not in HOST_TENSOR_CALLERS:
                self.syncs[kind] += 1
            return original(*args, **kwargs)
        self._patches.append((owner, attribute, original))
        setattr(owner, attribute, counted)

    def __enter__(self):
        self._count_calls(torch.Tensor, "tolist", ".tolist()")
        self._count_calls(torch.cuda, "synchronize", "torch.cuda.synchronize()")
        try:
            import bitsandbytes.optim.optimizer as bnb_optimizer
            self._count_calls(bnb_optimizer, "sync_gpu", "bitsandbytes sync_gpu")
        except ImportError:
            pass
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, attribute, original in reversed(self._patches):
            setattr(owner, attribute, original)
        self._patches.clear()
        return super().__exit__(*exc)

    def snapshot(self) -> tuple[collections.Counter, collections.Counter]:
        return collections.Counter(self.kernels), collections.Counter(self.syncs)


class _Done(Exception):
    """Raised from on_step once the wanted steps are done (nothing is saved)."""


def images(count: int, size: int, seed: int) -> list[SubjectImage]:
    return [SubjectImage(f"{seed}-{i}.png", image) for i, image in enumerate(noise_images(count, size, seed))]


def train_steps(setting: str, steps: int, bundle, device: str, resolution: int, on_step_end) -> None:
    """steps + 1 steps of train() at `setting` (the first a warm-up), on_step_end(step) after each; nothing saved."""
    with tempfile.TemporaryDirectory(prefix="step-profile-") as folder:
        cfg = TrainConfig(**{**parse_setting(setting).ours, "base_model": bundle.source_name, "instance_dir": folder,
                             "identifier": "zwx", "class_noun": "dog", "output": f"{folder}/out.safetensors",
                             "resolution": resolution, "max_train_steps": steps + 1, "num_class_images": 2,
                             "device": device, "seed": 0})

        class Clock(Callbacks):
            def on_step(self, info):
                on_step_end(info.step)
                if info.step > steps:
                    raise _Done

        try:
            train(cfg, bundle=bundle, callbacks=Clock(), instance_images=images(2, resolution, 0),
                  class_images=images(2, resolution, 1))
        except _Done:
            pass


def run(setting: str, steps: int, count: bool, family: str = "sd1", small: bool = False,
        resolution: int = 64) -> dict:
    """`steps` steps of train() at `setting` on the CPU, as on a GPU: per step (the last one's counts; the median
    time after the first step), {"kernels": Counter, "syncs": Counter} with `count`, else {"cpu_ms": float}."""
    bundle = random_bundle(family, small=True, configs=None if small else slim_configs(family))
    counter = Counter() if count else None
    ends: list[float] = []
    snapshots: list[tuple[collections.Counter, collections.Counter]] = []

    def step_end(step: int) -> None:
        ends.append(time.perf_counter())
        if counter is not None:
            snapshots.append(counter.snapshot())

    with emulating_gpu(24 * 2 ** 30), cuda_defaults(), counter if counter is not None else contextlib.nullcontext():
        train_steps(setting, steps, bundle, "cpu", resolution, step_end)
    if counter is not None:
        (kernels_before, syncs_before), (kernels, syncs) = snapshots[-2], snapshots[-1]
        return {"kernels": kernels - kernels_before, "syncs": syncs - syncs_before}
    return {"cpu_ms": 1000 * statistics.median(b - a for a, b in zip(ends, ends[1:]))}


def profile_on_device(setting: str, device: str = "cuda", warmup: int = 3, family: str = "sd1",
                      small: bool = False) -> dict:
    """One step of `setting` after `warmup` steps under torch.profiler, on the full-size random model at its native
    size (`small`: the tests' tiny one at 64 px): the step's wall time, the step before it (unprofiled: what the
    profiler itself adds shows as the difference), the GPU's busy time in the step (its kernels' and copies' summed
    durations), the kernels launched and the host's waits for the GPU, by name."""
    bundle = random_bundle(family, small=small)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    profiler = torch.profiler.profile(activities=activities)
    ends: list[float] = []

    def step_end(step: int) -> None:  # the step's losses are read by now, so its kernels have all run
        ends.append(time.perf_counter())
        if step == warmup:
            profiler.start()
        elif step == warmup + 1:
            profiler.stop()

    train_steps(setting, warmup, bundle, device, 64 if small else NATIVE_RESOLUTION[family], step_end)
    return {"setting": setting, "step_ms": 1000 * (ends[-1] - ends[-2]), "unprofiled_ms": 1000 * (ends[-2] - ends[-3]),
            **device_summary(profiler.events())}


def device_summary(events) -> dict:
    """From torch.profiler's events: the GPU's busy milliseconds, the kernel launches, the host's waits by name, and
    how often each ATen op ran on the host."""
    return {"gpu_busy_ms": sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA) / 1000,
            "launches": sum(e.name in LAUNCHES for e in events),
            "waits": collections.Counter(e.name for e in events if e.name in WAITS),
            "ops": collections.Counter(e.name for e in events if e.device_type == DeviceType.CPU)}


def gpu_markdown(results: list[dict]) -> str:
    lines = ["| setting | step ms (profiled) | step ms (not) | GPU busy ms | GPU busy | kernel launches | waits |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        waits = ", ".join(f"{n} {name}" for name, n in sorted(r["waits"].items())) or "0"
        lines.append(f"| {r['setting']} | {r['step_ms']:.1f} | {r['unprofiled_ms']:.1f} | {r['gpu_busy_ms']:.1f} | "
                     f"{100 * r['gpu_busy_ms'] / r['step_ms']:.0f}% | {r['launches']} | {waits} |")
    return "\n".join(lines)


def profile(setting: str, steps: int, **model) -> dict:
    counted = run(setting, steps=2, count=True, **model)
    return {"setting": setting, **counted, **run(setting, steps=steps, count=False, **model)}


def markdown(results: list[dict]) -> str:
    """The table; each setting's time against the first one with the same text-encoder choice."""
    def trains_text_encoder(result: dict) -> bool:
        return "te" in result["setting"].split("+")

    lines = ["| setting | kernels / step | host syncs / step | CPU ms / step | vs |", "|---|---:|---|---:|---|"]
    for r in results:
        first = next(other for other in results if trains_text_encoder(other) == trains_text_encoder(r))
        syncs = ", ".join(f"{n} {kind}" for kind, n in sorted(r["syncs"].items())) or "0"
        lines.append(f"| {r['setting']} | {sum(r['kernels'].values())} | {syncs} | {r['cpu_ms']:.1f} | "
                     f"{r['cpu_ms'] / first['cpu_ms']:.2f}x {first['setting']} |")
    return "\n".join(lines)


def top_kernels(result: dict, n: int = 10) -> str:
    return ", ".join(f"{name} {k}" for name, k in result["kernels"].most_common(n))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting (after one warm-up step)")
    parser.add_argument("--small", action="store_true", help="the tests' tiny model instead of slim SD 1.5 (seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier times)")
    parser.add_argument("--gpu", action="store_true",
                        help="on a GPU instead: one step per setting of the full-size random SD 1.5 at 512 px under "
                             "torch.profiler (the GPU's busy share of the step, launches, waits), about 20 s each")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # (its note on every random model's casts)
    results = []
    for setting in args.settings:
        if args.gpu:
            results.append(profile_on_device(setting, "cuda", small=args.small))
            r = results[-1]
            print(f"{setting}: {r['step_ms']:.1f} ms a step ({r['unprofiled_ms']:.1f} unprofiled), GPU busy "
                  f"{r['gpu_busy_ms']:.1f} ms, {r['launches']} launches, waits {dict(r['waits'])}", flush=True)
            continue
        torch.set_num_threads(args.threads)
        results.append(profile(setting, args.steps, small=args.small))
        r = results[-1]
        print(f"{setting}: {sum(r['kernels'].values())} kernels, syncs {dict(r['syncs'])}, {r['cpu_ms']:.1f} CPU "
              f"ms per step; most launched: {top_kernels(r)}", flush=True)
    print(gpu_markdown(results) if args.gpu else markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
