"""What scoring while training costs: the same run with and without evaluate_every, side by side.

On the toy world (the CPU, minutes): the demo's 400 steps, without evaluation and evaluated every 100 steps (at step
0, 100, ..., 400: five evaluations of 20 samples each, scored by the toy evaluators). On a GPU the same comparison on
a real model is part of bench/gpu_check.sh's plan for issue 13 (not run yet: no GPU was lent).

    python bench/evaluation_cost.py [--steps 400] [--every 100]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from trainer.loop import train  # noqa: E402 (after the path above)
from trainer.models import load_model  # noqa: E402
from trainer.toy import experiment as ex  # noqa: E402
from trainer.toy.evaluators import load_evaluators  # noqa: E402


def timed_run(workdir: Path, steps: int, every: int) -> tuple[float, int]:
    """Wall time of one toy run (class images already cached, so only training and evaluation count)."""
    variant = dataclasses.replace(ex.Variant("toy-subject"), steps=steps)
    cfg = dataclasses.replace(ex.train_config(variant, workdir), evaluate_every=every,
                              output=str(workdir / f"run-{steps}-{every}.safetensors"))
    evaluation = ex.evaluation(variant, load_evaluators()) if every else None
    bundle = load_model(ex.BASE)
    started = time.monotonic()
    result = train(cfg, bundle=bundle, evaluation=evaluation)
    return time.monotonic() - started, len(result.evaluations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the toy tests run: tiny ops, one thread beats two contended ones
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        ex.write_photos(workdir / "photos")
        timed_run(workdir, 1, 0)  # caches the class images, warms up
        plain, _ = timed_run(workdir, args.steps, 0)
        evaluated, count = timed_run(workdir, args.steps, args.every)
    print(f"toy world, {args.steps} steps: {plain:.1f} s without evaluation, {evaluated:.1f} s with {count} "
          f"evaluations (every {args.every} steps): +{100 * (evaluated / plain - 1):.1f}%")


if __name__ == "__main__":
    main()
