"""Child side of bench/dreambooth_bench.py: one training run in this process, measured from inside it.

    python bench/probe.py ours RESULT.json SPEC.json
    python bench/probe.py reference RESULT.json SCRIPT -- SCRIPT_ARGS...
    python bench/probe.py ours-class-images RESULT.json SPEC.json
    python bench/probe.py reference-class-images RESULT.json SPEC.json

Both sides are measured the same way:
- a timestamp (time.perf_counter after torch.cuda.synchronize) at the end of every optimizer step: our train()'s
  Callbacks.on_step, and the reference's per-step `accelerator.log(...)` call, which its loop makes right after
  `loss.item()`;
- on CUDA, torch.cuda.max_memory_allocated / max_memory_reserved over the whole process (model loading, the VAE and
  text encoder, the steps), the peak counters reset when the process starts;
- the run is stopped right after its last step (StopAfterLastStep), so neither side spends time saving the model.

The reference side runs under another Python (one with torchvision), so this file imports only the standard library and
torch at the top; the reference script is loaded with runpy, as tests/reference_harness.py does, and nothing in it is
changed except that Accelerator.log is wrapped to take the timestamps.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


class StopAfterLastStep(Exception):
    """Raised from the end-of-step hook once the wanted number of steps is done."""


class StepClock:
    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.step_end_s: list[float] = []
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def step_done(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_end_s.append(time.perf_counter())
        if len(self.step_end_s) >= self.total_steps:
            raise StopAfterLastStep

    def result(self) -> dict:
        cuda = torch.cuda.is_available()
        return {
            "step_end_s": self.step_end_s,
            "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
            "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }


def _apply_threads() -> None:
    threads = os.environ.get("BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def run_ours(spec: dict) -> dict:
    """Our train() on the saved random model, loaded by the real loader."""
    sys.path.insert(0, str(REPO_ROOT))
    from trainer.callbacks import Callbacks
    from trainer.config import TrainConfig
    from trainer.loop import train

    cfg = TrainConfig(**spec["config"])
    cap = spec.get("cap_gib")
    if cap and torch.cuda.is_available():  # as on a card of that size (bench/capped.py)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2 ** 30 / total))
    clock = StepClock(cfg.max_train_steps)

    class Timed(Callbacks):
        def on_step(self, info):
            clock.step_done()

    try:
        train(cfg, callbacks=Timed())
    except StopAfterLastStep:
        pass
    return clock.result()


def run_ours_class_images(spec: dict) -> dict:
    """trainer.priors as train() runs it (half precision on a GPU, PNGs written to the cache); a timestamp as each
    image's file is in place."""
    sys.path.insert(0, str(REPO_ROOT))
    import tempfile

    from trainer.device import resolve_device
    from trainer.models import load_model
    from trainer.priors import make_class_priors

    device = resolve_device("auto")
    bundle = load_model(spec["model"])
    clock = StepClock(spec["count"] + 1)  # never stops early
    make_class_priors(bundle, "a dog", count=spec["count"], cache_root=tempfile.mkdtemp(), device=device,
                      batch_size=spec["batch_size"], width=spec["size"], height=spec["size"], steps=spec["steps"],
                      on_progress=lambda done, total: done and clock.step_done())
    clock.step_end_s[-1] = time.perf_counter()  # the last image counts once its file is written
    return clock.result()


def run_reference_class_images(spec: dict) -> dict:
    """diffusers' StableDiffusionPipeline as its documentation runs it: from the model folder in half precision on
    the GPU, the same scheduler and settings, one generator per image; a timestamp as each batch is returned."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    cuda = torch.cuda.is_available()
    dtype = (torch.bfloat16 if torch.cuda.get_device_properties(0).major >= 8 else torch.float16) if cuda \
        else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(spec["model"], torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    clock = StepClock(spec["count"] + 1)
    for start in range(0, spec["count"], spec["batch_size"]):
        n = min(spec["batch_size"], spec["count"] - start)
        generators = [torch.Generator("cpu").manual_seed(start + i) for i in range(n)]
        pipe(prompt=["a dog"] * n, num_inference_steps=spec["steps"], guidance_scale=7.5, width=spec["size"],
             height=spec["size"], generator=generators, output_type="pil")
        for _ in range(n):
            clock.step_done()
    return clock.result()


def run_reference(script: str, script_args: list[str]) -> dict:
    import runpy

    import accelerate

    steps = int(script_args[script_args.index("--max_train_steps") + 1])
    clock = StepClock(steps)
    accelerator_log = accelerate.Accelerator.log

    def timed_log(self, values, step=None, log_kwargs=None):
        accelerator_log(self, values, step=step, log_kwargs=log_kwargs)
        clock.step_done()

    accelerate.Accelerator.log = timed_log
    datasets = "none needed"
    if "from datasets import" in Path(script).read_text():  # train_text_to_image_sdxl.py
        try:
            import datasets as found
            datasets = found.__version__
        except ImportError:  # the lent GPU has no `datasets`: rows on the host only (bench/stand_ins/README.md)
            sys.path.insert(0, str(REPO_ROOT / "bench" / "stand_ins"))
            datasets = "stand-in"
    namespace = runpy.run_path(script, run_name="reference_train_dreambooth")  # defines, does not train
    sys.argv = [script, *script_args]
    try:
        namespace["main"](namespace["parse_args"](script_args))
    except StopAfterLastStep:
        pass
    return {**clock.result(), "datasets": datasets}


def main(argv: list[str]) -> None:
    kind, result_path, rest = argv[0], Path(argv[1]), argv[2:]
    _apply_threads()
    if kind == "ours":
        result = run_ours(json.loads(Path(rest[0]).read_text()))
    elif kind == "ours-class-images":
        result = run_ours_class_images(json.loads(Path(rest[0]).read_text()))
    elif kind == "reference-class-images":
        result = run_reference_class_images(json.loads(Path(rest[0]).read_text()))
    elif kind == "reference":
        assert rest[1] == "--", "usage: probe.py reference RESULT.json SCRIPT -- SCRIPT_ARGS..."
        result = run_reference(rest[0], rest[2:])
    else:
        raise SystemExit(f"unknown run kind {kind!r}: 'ours' or 'reference'")
    result_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
