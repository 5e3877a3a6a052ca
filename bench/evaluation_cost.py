"""What scoring while training costs: the same run with and without evaluate_every, side by side.

- The toy world (the default; the CPU, minutes): the demo's 400 steps, without evaluation and evaluated every 100
  steps (at step 0, 100, ..., 400: five evaluations), scored by the toy evaluators.
- A real-size model (`--family sd1|sdxl`, for a GPU): a full-size model of random weights (speed does not depend on
  the values) trained `--steps` at `--preset` on random photos, without and with scoring every `--every` steps by a
  DINO ViT-S/16 of random weights built from its config (the paper's model, at its size), the DreamBooth way: the
  subject in the paper's four contexts and the class prompt, two seeds each. `--small` runs the same wiring on tiny
  models (a CPU check of the script).

    python bench/evaluation_cost.py [--steps 400] [--every 100] [--repeat 3]
    python bench/evaluation_cost.py --family sd1 --preset 24GB --steps 400 --every 100     # on a GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.models import noise_images, random_bundle  # noqa: E402 (after the path above)
from trainer.config import TrainConfig  # noqa: E402
from trainer.evaluation import Evaluation  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.measure import EmbeddingScorer, load_embedders  # noqa: E402
from trainer.models import load_model  # noqa: E402
from trainer.toy import experiment as ex  # noqa: E402
from trainer.toy.evaluators import load_evaluators  # noqa: E402

# DINO ViT-S/16 (facebook/dino-vits16) and its preprocessing, at the size the paper scores with.
DINO_VITS16 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                   image_size=224, patch_size=16)
DINO_PREPROCESSOR = {"feature_extractor_type": "ViTFeatureExtractor", "size": 224, "resample": 2, "do_resize": True,
                     "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
TINY_DINO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, image_size=32,
                 patch_size=8)


def toy_run(workdir: Path, steps: int, every: int) -> tuple[float, int]:
    """Wall time of one toy run (class images already cached, so only training and evaluation count)."""
    variant = dataclasses.replace(ex.Variant("toy-subject"), steps=steps)
    cfg = dataclasses.replace(ex.train_config(variant, workdir), evaluate_every=every,
                              output=str(workdir / f"run-{steps}-{every}.safetensors"))
    evaluation = ex.evaluation(variant, load_evaluators()) if every else None
    bundle = load_model(ex.BASE)
    started = time.monotonic()
    result = train(cfg, bundle=bundle, evaluation=evaluation)
    return time.monotonic() - started, len(result.evaluations)


def write_random_photos(folder: Path, count: int, size: int, seed: int) -> list[Image.Image]:
    folder.mkdir(parents=True, exist_ok=True)
    images = noise_images(count, size, seed)
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
    return images


def dino_scorer(folder: Path, small: bool) -> EmbeddingScorer:
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(**(TINY_DINO if small else DINO_VITS16)), add_pooling_layer=False).save_pretrained(folder)
    preprocessor = {**DINO_PREPROCESSOR, "size": 32} if small else DINO_PREPROCESSOR
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return EmbeddingScorer(load_embedders([folder]))


def model_run(workdir: Path, args, every: int) -> tuple[float, int]:
    """Wall time of one run on a real-size model of random weights (class images given, so only training and
    evaluation count)."""
    bundle = random_bundle(args.family, small=args.small)
    size = 64 if args.small else 0
    photos = write_random_photos(workdir / "photos", 5, size or 512, seed=0)
    write_random_photos(workdir / "class", 5, size or 512, seed=1)
    cfg = TrainConfig(base_model="random", instance_dir=str(workdir / "photos"), class_dir=str(workdir / "class"),
                      identifier="zwx", class_noun="dog", output=str(workdir / f"run-{every}.safetensors"),
                      num_class_images=5, resolution=size, max_train_steps=args.steps, memory_preset=args.preset,
                      device=args.device, evaluate_every=every, overwrite=True)
    evaluation = (Evaluation.in_contexts(dino_scorer(workdir / "dino", args.small), photos, "zwx dog", "a dog")
                  if every else None)
    started = time.monotonic()
    result = train(cfg, bundle=bundle, evaluation=evaluation)
    return time.monotonic() - started, len(result.evaluations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--family", choices=("sd1", "sdxl"), help="a real-size model of random weights (GPU)")
    parser.add_argument("--preset", default="auto", help="the memory preset of the real-size runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="tiny models: a CPU check of the --family wiring")
    parser.add_argument("--repeat", type=int, default=3, help="toy world: pairs of runs, the median reported")
    args = parser.parse_args()
    if not args.family:
        torch.set_num_threads(1)  # the toy tests' setting: tiny ops, one thread beats two contended ones
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        if args.family:
            model_run(workdir / "warm-up", argparse.Namespace(**{**vars(args), "steps": 1}), 0)
            plain, _ = model_run(workdir / "plain", args, 0)
            evaluated, count = model_run(workdir / "scored", args, args.every)
            what = f"{args.family}{' (tiny)' if args.small else ''}, preset {args.preset}"
        else:
            ex.write_photos(workdir / "photos")
            toy_run(workdir, 1, 0)  # caches the class images, warms up
            # Alternately, `--repeat` times: a shared machine's slow minute then falls on both sides.
            pairs = [(toy_run(workdir, args.steps, 0)[0], toy_run(workdir, args.steps, args.every))
                     for _ in range(args.repeat)]
            plain = statistics.median(p for p, _ in pairs)
            evaluated, count = statistics.median(e for _, (e, _) in pairs), pairs[0][1][1]
            what = f"toy world, median of {args.repeat}"
            if args.repeat > 1:
                print("each pair: " + ", ".join(f"+{100 * (e / p - 1):.1f}%" for p, (e, _) in pairs))
    print(f"{what}, {args.steps} steps: {plain:.1f} s without evaluation, {evaluated:.1f} s with {count} "
          f"evaluations (every {args.every} steps): +{100 * (evaluated / plain - 1):.1f}%")


if __name__ == "__main__":
    main()
