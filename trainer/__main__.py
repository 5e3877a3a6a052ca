"""Command line: python -m trainer {pick-token, priors, train, sample, demo} --help"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from pathlib import Path

from .config import ConfigError, TrainConfig
from .prompts import class_prompt

# Short names for the settings people type most; every other TrainConfig field is --field-name.
_ALIASES = {"base_model": ["--model"], "instance_dir": ["--images"]}
_SECTIONS = {"base_model": "what to learn", "with_prior_preservation": "prior preservation",
             "resolution": "optimisation", "device": "memory and speed", "save_dtype": "saving, resuming, previews"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, ValueError, FileNotFoundError, MemoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="DreamBooth for Stable Diffusion 1.x/2.x: teach a checkpoint your subject from 3-5 photos.",
        epilog="Typical run: pick-token, then train (class images are generated and cached on the way), "
               "then sample. Each sub-command has its own --help.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    pick = sub.add_parser("pick-token", help="propose rare identifiers with the weakest prior in your checkpoint",
                          description="List rare one-token identifiers, weakest prior in your checkpoint first.")
    pick.add_argument("--model", required=True, help="base checkpoint (.safetensors) or diffusers folder")
    pick.add_argument("--class-noun", required=True, help="what the subject is, e.g. dog")
    pick.add_argument("--count", type=int, default=10, help="how many identifiers to list (default 10)")
    pick.add_argument("--candidates", type=int, default=200,
                      help="how many vocabulary tokens to screen with the text encoder (200)")
    pick.add_argument("--shortlist", type=int, default=40,
                      help="how many of those to measure on the denoiser, the decisive test (40)")
    pick.add_argument("--seed", type=int, default=0, help="the same seed gives the same list")
    pick.set_defaults(run=_pick_token)

    priors = sub.add_parser("priors", help="generate (or reuse) class images of 'a [class noun]'",
                            description="Generate class images with the frozen base model into a cache; "
                                        "asking again reuses them, asking for more adds only the missing ones.")
    priors.add_argument("--model", required=True, help="base checkpoint (.safetensors) or diffusers folder")
    priors.add_argument("--class-noun", required=True, help="what the subject is, e.g. dog")
    priors.add_argument("--count", type=int, default=200, help="how many images (200)")
    priors.add_argument("--cache", default="dreambooth_priors", help="cache folder (./dreambooth_priors)")
    _add_sampling_options(priors, steps=30)
    priors.set_defaults(run=_priors)

    train = sub.add_parser("train", help="fine-tune the checkpoint on your photos",
                           usage="python -m trainer train --model BASE.safetensors --images PHOTOS_DIR "
                                 "--identifier ID --class-noun NOUN --output OUT.safetensors [options]",
                           description="Fine-tune with prior preservation and write one .safetensors that loads in "
                                       "ComfyUI and A1111. Ctrl-C stops after the current step and keeps a state; "
                                       "running the same command again resumes.")
    _add_config_options(train)
    train.set_defaults(run=_train)

    sample = sub.add_parser("sample", help="draw a few images from a checkpoint",
                            description="Draw images from a checkpoint, e.g. your trained subject in a new scene.")
    sample.add_argument("--model", required=True, help="checkpoint (.safetensors) or diffusers folder")
    sample.add_argument("--prompt", required=True, action="append", help="prompt (repeat for several)")
    sample.add_argument("--count", type=int, default=4, help="images per prompt (4)")
    sample.add_argument("--out", default="samples", help="folder for the PNGs (./samples)")
    _add_sampling_options(sample, steps=30)
    sample.set_defaults(run=_sample)

    demo = sub.add_parser("demo", help="see DreamBooth work in a few CPU minutes on the bundled toy model",
                          description="Train the toy subject (a marked star) into the bundled toy base model and "
                                      "write a before/after grid: no GPU, no download.")
    demo.add_argument("--out", default="toy_demo", help="folder for the photos, model and grid (./toy_demo)")
    demo.set_defaults(run=_demo)
    return parser


def _add_sampling_options(parser, steps: int) -> None:
    parser.add_argument("--size", type=int, default=512, help="image width and height in pixels (512)")
    parser.add_argument("--steps", type=int, default=steps, help=f"sampling steps ({steps})")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (7.5)")
    parser.add_argument("--sampler", default="euler_a", help="ddim, euler, euler_a or dpmpp_2m (euler_a)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")


def _add_config_options(parser) -> None:
    group = None
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SECTIONS:
            group = parser.add_argument_group(_SECTIONS[f.name])
        flags = [f"--{f.name.replace('_', '-')}"] + _ALIASES.get(f.name, [])
        help_text = f.metadata["help"]
        if f.type == "bool":
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=help_text)
        elif f.type == "list[str]":
            group.add_argument(*flags, dest=f.name, action="append", default=[], help=help_text + " Repeatable.")
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            shown = f" (default {f.default})" if f.default not in ("", None) else ""
            group.add_argument(*flags, dest=f.name, type=kind, default=f.default, help=help_text + shown,
                               metavar=f.name.split("_")[-1].upper())


def _pick_token(args) -> int:
    from .api import pick_identifiers
    ranked = pick_identifiers(args.model, args.class_noun, count=args.count, candidates=args.candidates,
                              shortlist=args.shortlist, seed=args.seed, log=_log)
    print(f"{'identifier':<12} prior strength   (lower = weaker prior = better)")
    for token in ranked:
        print(f"{token.identifier:<12} {token.strength:.4f}")
    print(f"\nUse it as: --identifier {ranked[0].identifier} --class-noun {args.class_noun}")
    return 0


def _priors(args) -> int:
    from .api import class_images
    paths = class_images(
        args.model, class_prompt(args.class_noun), count=args.count, cache_root=args.cache, size=args.size,
        steps=args.steps, guidance=args.guidance, sampler=args.sampler, seed=args.seed, log=_log,
        on_progress=lambda done, total: print(f"\rclass images {done}/{total}", end="", flush=True))
    print(f"\n{len(paths)} class images in {paths[0].parent}")
    return 0


def _train(args) -> int:
    from .callbacks import TrainingCancelled
    from .loop import train
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    printer = _ConsolePrinter()
    signal.signal(signal.SIGINT, printer.request_stop)
    try:
        result = train(cfg, callbacks=printer)
    except TrainingCancelled as cancelled:
        print(f"\n{cancelled}. Run the same command again to resume.")
        return 130
    print(f"\nSaved {result.output} after {result.steps} steps. Prompt with: {cfg.instance_prompt!r}")
    return 0


def _sample(args) -> int:
    from .api import sample
    prompts = [p for p in args.prompt for _ in range(args.count)]
    seeds = [args.seed + i for i in range(len(prompts))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = sample(args.model, prompts, seeds=seeds, size=args.size, steps=args.steps, guidance=args.guidance,
                    sampler=args.sampler, log=_log)
    for i, (image, seed) in enumerate(zip(images, seeds)):
        image.save(out / f"{i:03d}-seed{seed}.png")
    print(f"{len(images)} images in {out}")
    return 0


def _demo(args) -> int:
    from .toy.demo import run
    run(Path(args.out), callbacks=_ConsolePrinter())
    return 0


def _log(message: str) -> None:
    print(message, flush=True)


class _ConsolePrinter:
    """One status line per step; the first Ctrl-C asks the loop to stop cleanly, a second one kills."""

    def __init__(self):
        self.stop = False
        self.last_print = 0.0

    def request_stop(self, *_):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\nStopping after this step (Ctrl-C again to kill)...", flush=True)

    def should_stop(self) -> bool:
        return self.stop

    def on_step(self, info) -> None:
        now = time.monotonic()
        if now - self.last_print < 0.5 and info.step < info.total:
            return
        self.last_print = now
        print(f"\rstep {info.step}/{info.total}  loss {info.loss:.4f} (subject {info.instance_loss:.4f}, "
              f"prior {info.prior_loss:.4f})  lr {info.lr:.2e}  left {_duration(info.eta_s)}   ", end="", flush=True)

    def on_samples(self, step, images) -> None:
        pass

    def log(self, message: str) -> None:
        print(message, flush=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


if __name__ == "__main__":
    sys.exit(main())
