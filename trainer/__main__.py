"""Command line: python -m trainer {pick-token, priors, train, sample, evaluate, demo} --help"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from pathlib import Path

from . import quiet
from .config import ConfigError, TrainConfig
from .prompts import class_prompt

# Short names for the settings people type most; every other TrainConfig field is --field-name.
_ALIASES = {"base_model": ["--model"], "instance_dir": ["--images"]}
_SECTIONS = {"base_model": "what to learn", "with_prior_preservation": "prior preservation",
             "resolution": "optimisation", "device": "memory and speed", "save_dtype": "saving, resuming, previews",
             "evaluate_every": "knowing when it worked"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    quiet.install()
    try:
        return args.run(args)
    except (ConfigError, ValueError, OSError, MemoryError) as error:  # OSError: files, folders, disk space
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: whatever was being written is left as it was before
        print("\nInterrupted. Files already written are complete; a training state being saved was not replaced, "
              "so the last complete one is kept.", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="DreamBooth for Stable Diffusion 1.x, 2.x and XL (and models built on them: Pony, Illustrious, "
                    "NoobAI...): teach a checkpoint your subject from 3-5 photos. The family is read from the file; "
                    "SDXL trains at 1024 px unless --resolution says otherwise.",
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
    priors.add_argument("--cache", help="cache folder (default: the one train uses too, "
                        "$XDG_CACHE_HOME or ~/.cache, then dreambooth-studio/class-images)")
    _add_sampling_options(priors, steps=30)
    priors.set_defaults(run=_priors)

    train = sub.add_parser("train", help="fine-tune the checkpoint on your photos",
                           usage="python -m trainer train --model BASE.safetensors --images PHOTOS_DIR "
                                 "--identifier ID --class-noun NOUN --output OUT.safetensors [options]",
                           description="Fine-tune with prior preservation and write one .safetensors that loads in "
                                       "ComfyUI and A1111. Ctrl-C stops after the current step and keeps a state; "
                                       "running the same command again resumes.")
    _add_config_options(train)
    train.add_argument("--evaluation-models", action="append", default=[], metavar="PATH",
                       help="with --evaluate-every: a DINO/CLIP model file or folder, or a folder of them, to score "
                            "with (as for the evaluate command). Repeatable.")
    train.set_defaults(run=_train)

    sample = sub.add_parser("sample", help="draw a few images from a checkpoint",
                            description="Draw images from a checkpoint, e.g. your trained subject in a new scene.")
    sample.add_argument("--model", required=True, help="checkpoint (.safetensors) or diffusers folder")
    sample.add_argument("--prompt", required=True, action="append", help="prompt (repeat for several)")
    sample.add_argument("--count", type=int, default=4, help="images per prompt (4)")
    sample.add_argument("--out", default="samples", help="folder for the PNGs (./samples)")
    _add_sampling_options(sample, steps=30)
    sample.set_defaults(run=_sample)

    evaluate = sub.add_parser(
        "evaluate", help="measure the trained subject: DINO, CLIP-I, CLIP-T, PRES as the DreamBooth paper does",
        description="Score generated images against the subject's photos with the DreamBooth paper's metrics (DINO and "
                    "CLIP-I: subject fidelity, CLIP-T: prompt fidelity, PRES: language drift), using the embedding "
                    "models you give with --models; nothing is downloaded. A metric whose model is missing is skipped "
                    "with a note saying which file to put where.")
    evaluate.add_argument("--photos", required=True, help="folder of real photos of the subject (held-out ones, not "
                                                          "the training photos, measure best)")
    evaluate.add_argument("--generated", help="folder of images drawn with the identifier ('a zwx dog on the beach'); "
                                              "each one's prompt is read from the .txt file of the same name beside "
                                              "it, or from its PNG 'parameters' (A1111, Forge)")
    evaluate.add_argument("--prompt", help="the prompt of every generated image that has none of its own")
    evaluate.add_argument("--class-samples", help="folder of the trained model's samples of 'a [class noun]' (PRES)")
    evaluate.add_argument("--identifier", default="", help="the identifier (e.g. zwx): CLIP-T reads the prompts "
                                                           "without it")
    evaluate.add_argument("--models", action="append", default=[], metavar="PATH",
                          help="an embedding model, or a folder of them (repeatable): CLIP vision .safetensors files "
                               "as in ComfyUI's models/clip_vision, transformers folders of a CLIP or a DINO "
                               "(facebook/dino-vits16, the paper's). The paper's DINO and a full CLIP are picked "
                               "first")
    evaluate.add_argument("--table", help="also write the table as a PNG image here")
    evaluate.add_argument("--device", default="cpu", help="where the models run: cpu (default), cuda, ...")
    evaluate.set_defaults(run=_evaluate)

    demo = sub.add_parser("demo", help="see DreamBooth work in a few CPU minutes on the bundled toy model",
                          description="Train the toy subject (a marked star) into the bundled toy base model and "
                                      "write a before/after grid: no GPU, no download.")
    demo.add_argument("--out", default="toy_demo", help="folder for the photos, model and grid (./toy_demo)")
    demo.set_defaults(run=_demo)
    return parser


def _add_sampling_options(parser, steps: int) -> None:
    parser.add_argument("--size", type=int, help="image width and height in pixels (default: the model's own, "
                                                 "512 for SD 1.5, 1024 for SDXL)")
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
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if f.type == "bool":
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f"{help_text} (default: {'on' if f.default else 'off'})")
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
    from .priors import default_cache_root
    progress = Progress("Class images", args.count)
    paths = class_images(
        args.model, class_prompt(args.class_noun), count=args.count, cache_root=args.cache or default_cache_root(),
        size=args.size, steps=args.steps, guidance=args.guidance, sampler=args.sampler, seed=args.seed, log=_log,
        on_progress=lambda done, total: progress.update(done))
    print(f"{len(paths)} class images in {paths[0].parent}")
    return 0


def _train(args) -> int:
    from .callbacks import TrainingCancelled
    from .distributed import join
    from .loop import train
    from .evaluation import BestStep
    from .plots import evaluation_curve
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    evaluation = None
    if cfg.evaluate_every:
        from .api import evaluation_with_models
        if not args.evaluation_models:
            raise ConfigError("--evaluate-every needs --evaluation-models PATH: a folder with a DINO ViT-S/16 (as the "
                              "paper) and/or a CLIP model; see the README, Measuring the result")
        from .dataset import load_image_folder
        photos = [item.image for item in load_image_folder(cfg.validate().instance_dir)]
        evaluation = evaluation_with_models(cfg, photos, args.evaluation_models, home="the --evaluation-models folder")
    printer = _ConsolePrinter(speaks=join().main)
    signal.signal(signal.SIGINT, printer.request_stop)
    try:
        result = train(cfg, callbacks=printer, evaluation=evaluation)
    except TrainingCancelled as cancelled:
        if join().main:
            print(f"\n{cancelled}. Run the same command again to resume.")
        return 130
    if not join().main:  # data parallel: rank 0 speaks for the run
        return 0
    if result.evaluations:
        curve = Path(result.output).with_suffix(".evaluation.png")
        pres_limit = BestStep(cfg.max_pres_rise, result.evaluations).pres_limit
        evaluation_curve(result.evaluations, result.saved_step, pres_limit).save(curve)
        print(f"Scores of each evaluated step: {curve}")
    kept = f" (the weights of step {result.saved_step}, the best evaluated)" if result.saved_step != result.steps else ""
    print(f"Saved {result.output} after {result.steps} steps{kept}. Prompt with: {cfg.instance_prompt!r}")
    return 0


def _sample(args) -> int:
    from .api import sample
    prompts = [p for p in args.prompt for _ in range(args.count)]
    seeds = [args.seed + i for i in range(len(prompts))]
    out = Path(args.out)
    _check_writable(out)
    names = [f"{i:03d}-{_slug(prompt)}-seed{seed}.png" for i, (prompt, seed) in enumerate(zip(prompts, seeds))]
    progress = Progress("Images", len(prompts))

    def save(index, image):  # each as soon as it is drawn: a Ctrl-C keeps the ones done
        image.save(out / names[index])
        progress.update(index + 1)

    try:
        sample(args.model, prompts, seeds=seeds, size=args.size, steps=args.steps, guidance=args.guidance,
               sampler=args.sampler, log=_log, on_image=save)
    except KeyboardInterrupt:
        print(f"\nInterrupted: {progress.done} of {len(prompts)} images are in {out}.", file=sys.stderr)
        return 130
    print(f"{len(prompts)} images in {out}")
    return 0


def _slug(prompt: str) -> str:
    """A file-name part that says which prompt made the image: 'a zwx dog on the beach' -> 'a-zwx-dog-on-the-beach'."""
    return "-".join("".join(c if c.isalnum() else " " for c in prompt.lower()).split())[:60] or "prompt"


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OSError(f"--out: cannot write into {folder} ({error.strerror or error}); choose a folder you can "
                      "write to") from None


def _evaluate(args) -> int:
    from .dataset import load_image_folder
    from .measure import load_embedders, measure, read_images, table_image, table_text
    if not args.generated and not args.class_samples:
        raise ValueError("give --generated (images of the subject, for DINO, CLIP-I and CLIP-T) and/or "
                         "--class-samples (images of 'a [class noun]', for PRES)")
    photos = [photo.image for photo in load_image_folder(args.photos, max_images=1000)]
    generated, prompts = [], []
    if args.generated:
        generated, prompts, _ = read_images(args.generated)
        prompts = [prompt or args.prompt for prompt in prompts]
    class_samples = read_images(args.class_samples)[0] if args.class_samples else []
    models = load_embedders(args.models, home=args.models[0] if args.models else "models").to(args.device)
    if not args.models:
        models.notes.insert(0, "no --models given: put the models into a folder (e.g. models/) and pass it with "
                               "--models models")
    rows = measure(photos, generated, prompts, class_samples, models, identifier=args.identifier)
    print(table_text(rows, models.notes))
    if args.table:
        table_image(rows).save(args.table)
        print(f"Table image: {args.table}")
    return 0


def _demo(args) -> int:
    from .toy.demo import run
    run(Path(args.out), callbacks=_ConsolePrinter())
    return 0


def _log(message: str) -> None:
    print(message, flush=True)


class Progress:
    """A progress bar on a terminal; in a log file (not a terminal), a line at every tenth of the way and at least
    every minute, so a log shows progress without a line per image or step."""

    WIDTH = 24

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.done = label, max(total, 1), 0
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.last_line, self.last_tenth, self.open = 0.0, -1, False

    def update(self, done: int, extra: str = "") -> None:
        self.done = done
        now, tenth = time.monotonic(), done * 10 // self.total
        if self.tty:
            if now - self.last_line < 0.2 and done < self.total:
                return
            filled = self.WIDTH * done // self.total
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {extra}".rstrip() + "  ")
            self.open = done < self.total
            if not self.open:
                self.stream.write("\n")
        elif tenth > self.last_tenth or now - self.last_line >= 60 or done == self.total:
            self.stream.write(f"{self.label} {done}/{self.total} {extra}".rstrip() + "\n")
            self.last_tenth = tenth
        else:
            return
        self.last_line = now
        self.stream.flush()

    def interrupt(self) -> None:
        """Another line is about to be printed: leave the bar's line first."""
        if self.open:
            self.stream.write("\n")
            self.open = False


class _ConsolePrinter:
    """A progress bar for the steps and the class images; the first Ctrl-C asks the loop to stop cleanly (it saves a
    resumable state), a second one stops at once."""

    def __init__(self, speaks: bool = True):
        self.stop = False
        self.speaks = speaks  # data parallel: the launcher hands Ctrl-C to every process; rank 0 says it
        self.bars: dict[str, Progress] = {}

    def request_stop(self, *_):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        self._interrupt_bars()
        if self.speaks:
            print("Stopping after this step and saving a resumable state (Ctrl-C again to stop at once)...",
                  flush=True)

    def should_stop(self) -> bool:
        return self.stop

    def on_progress(self, what: str, done: int, total: int) -> None:
        self._bar(what, total).update(done)

    def on_step(self, info) -> None:
        self._bar("Training", info.total).update(
            info.step, f"loss {info.loss:.4f} (subject {info.instance_loss:.4f}, prior {info.prior_loss:.4f}) "
                       f"lr {info.lr:.2e}, {_duration(info.eta_s)} left")

    def on_samples(self, step, images) -> None:
        pass

    def on_evaluation(self, scores, best) -> None:
        chosen = f"best so far: step {best.best.step}" if best.best else "the base model's baseline"
        pres = "n/a (needs a DINO model)" if scores.pres is None else f"{scores.pres:.3f}"
        self.log(f"Step {scores.step}: subject fidelity {scores.subject_fidelity:.3f}, PRES {pres} ({chosen})")

    def log(self, message: str) -> None:
        self._interrupt_bars()
        print(message, flush=True)

    def _bar(self, what: str, total: int) -> Progress:
        if what not in self.bars or self.bars[what].total != max(total, 1):
            self.bars[what] = Progress(what, total)
        return self.bars[what]

    def _interrupt_bars(self) -> None:
        for bar in self.bars.values():
            bar.interrupt()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


if __name__ == "__main__":
    sys.exit(main())
