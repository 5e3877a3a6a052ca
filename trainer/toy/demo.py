"""The embedded demo: DreamBooth of the toy subject into the bundled toy base, on a CPU in a few minutes.

    python -m trainer demo --out toy_demo

writes toy_demo/photos/ (the 5 training photos), toy_demo/toy-subject.safetensors (the trained model: its best
evaluated step), toy_demo/evaluation.png (the scores of each evaluated step) and toy_demo/before_after.png: the same
prompts and seeds drawn by the base model and by the trained one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..callbacks import Callbacks
from ..bundle import ModelBundle
from ..evaluation import BestStep
from ..loop import train
from ..models import load_model
from ..plots import evaluation_curve
from . import experiment as ex
from . import world
from .evaluators import load_evaluators

VARIANT = ex.Variant("toy-subject")
# The demo trains up to 1600 steps, scores the model every 100 (trainer/evaluation.py, with the toy evaluators) and
# stops once subject fidelity has not improved for 4 evaluations: it saves the best step, not the last.
MAX_STEPS, EVALUATE_EVERY, PATIENCE = 1600, 100, 4
# Shown in the grid: some of the evaluation prompts (measure() samples them all), and the plain class prompt.
TEMPLATES = ["a {V} star on a green background", "a {V} star on a red background",
             "a blue {V} star on a white background", "a sketch of a {V} star", world.CLASS_PROMPT]
SEEDS = [0, 1, 2, 3]
CELL = 96  # the 32 px samples, enlarged


def before_after_grid(prompts: list[str], before: list[list[Image.Image]], after: list[list[Image.Image]],
                      photos: list[Image.Image]) -> Image.Image:
    """Top: the training photos. Then one row per prompt: its text, the base model's samples, the trained model's."""
    label_width, header, gap = 300, 24, 16
    seeds = len(before[0])
    width = label_width + 2 * seeds * CELL + gap
    height = header + CELL + header + len(before) * CELL
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    draw.font = ImageFont.load_default(size=14)  # a scalable font where Pillow has FreeType, else the bitmap one
    draw.text((8, header + CELL // 2 - 8), "training photos", fill="black")
    for i, photo in enumerate(photos):
        grid.paste(photo.resize((CELL, CELL), Image.NEAREST), (label_width + i * CELL, header))
    top = header + CELL
    draw.text((label_width + 8, top + 6), "base model", fill="black")
    draw.text((label_width + seeds * CELL + gap + 8, top + 6), "after DreamBooth", fill="black")
    for row, (old, new) in enumerate(zip(before, after)):
        y = top + header + row * CELL
        draw.text((8, y + CELL // 2 - 8), prompts[row], fill="black")
        for column, image in enumerate(old):
            grid.paste(image.resize((CELL, CELL), Image.NEAREST), (label_width + column * CELL, y))
        for column, image in enumerate(new):
            grid.paste(image.resize((CELL, CELL), Image.NEAREST), (label_width + (seeds + column) * CELL + gap, y))
    return grid


@dataclass
class DemoResult:
    grid: Path
    model: ModelBundle  # the trained model: the best evaluated step, as saved
    before: ex.Scores
    after: ex.Scores
    evaluations: list  # StepScores of every evaluated step
    saved_step: int


def run(out: Path, callbacks: Callbacks | None = None, log=print, variant: ex.Variant = VARIANT) -> DemoResult:
    """Train the toy subject (keeping its best evaluated step), write the before/after grid, the evaluation curve
    and print the scores."""
    evaluators = load_evaluators()
    base = load_model(ex.BASE)
    prompts = [variant.prompt(template) for template in TEMPLATES]
    before_scores, before = ex.measure(base, evaluators, variant, SEEDS, with_common_word=False)
    variant = replace(variant, steps=MAX_STEPS)
    log(f"Training the toy subject into {ex.BASE.name} (up to {variant.steps} steps, scored every {EVALUATE_EVERY}; "
        f"prior preservation {'on' if variant.prior else 'off'})")
    if not (out / "photos").is_dir():
        ex.write_photos(out / "photos")
    cfg = replace(ex.train_config(variant, out), evaluate_every=EVALUATE_EVERY, early_stop_patience=PATIENCE)
    result = train(cfg, bundle=base, callbacks=callbacks, evaluation=ex.evaluation(variant, evaluators))
    for scores in result.evaluations:
        log(f"  step {scores.step:>4}: subject fidelity {scores.subject_fidelity:+.3f}, PRES {scores.pres:+.3f}")
    trained = load_model(result.output)  # the saved step: the best evaluated one
    pres_limit = BestStep(cfg.max_pres_rise, result.evaluations).pres_limit
    evaluation_curve(result.evaluations, result.saved_step, pres_limit).save(out / "evaluation.png")
    log(f"Saved step {result.saved_step} of {result.steps}, the best evaluated (curve: {out / 'evaluation.png'})")
    after_scores, after = ex.measure(trained, evaluators, variant, SEEDS, with_common_word=False)
    photos = [Image.open(path).convert("RGB") for path in sorted((out / "photos").glob("*.png"))]
    path = out / "before_after.png"
    before_after_grid(prompts, [before[p] for p in prompts], [after[p] for p in prompts], photos).save(path)
    log(f"\nSubject fidelity (likeness to held-out photos of the subject; real photos score "
        f"{ex.real_image_fidelity(evaluators):.2f}):")
    log(f"  on new backgrounds: {before_scores.subject_fidelity_recontext:+.3f} before, "
        f"{after_scores.subject_fidelity_recontext:+.3f} after")
    log(f"  on all test prompts (new backgrounds, other colours, sketches): {before_scores.subject_fidelity:+.3f} "
        f"before, {after_scores.subject_fidelity:+.3f} after")
    log(f"PRES (plain '{world.CLASS_PROMPT}' looking like the subject; lower = no drift): {before_scores.pres:+.3f} "
        f"before, {after_scores.pres:+.3f} after")
    log(f"Wrote {path} and {out / (variant.name + '.safetensors')}")
    return DemoResult(path, trained, before_scores, after_scores, result.evaluations, result.saved_step)
