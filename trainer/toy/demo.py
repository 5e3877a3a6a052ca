"""The embedded demo: DreamBooth of the toy subject into the bundled toy base, on a CPU in a few minutes.

    python -m trainer demo --out toy_demo

writes toy_demo/photos/ (the 5 training photos), toy_demo/toy-subject.safetensors (the trained model) and
toy_demo/before_after.png: the same prompts and seeds drawn by the base model and by the trained one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..callbacks import Callbacks
from ..bundle import ModelBundle
from ..models import load_model
from . import experiment as ex
from . import world
from .evaluators import load_evaluators

VARIANT = ex.Variant("toy-subject")
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
    model: ModelBundle  # the trained model
    before: ex.Scores
    after: ex.Scores


def run(out: Path, callbacks: Callbacks | None = None, log=print, variant: ex.Variant = VARIANT) -> DemoResult:
    """Train the toy subject, write the before/after grid and print the scores."""
    evaluators = load_evaluators()
    base = load_model(ex.BASE)
    prompts = [variant.prompt(template) for template in TEMPLATES]
    before_scores, before = ex.measure(base, evaluators, variant, SEEDS, with_common_word=False)
    log(f"Training the toy subject into {ex.BASE.name} ({variant.steps} steps, prior preservation "
        f"{'on' if variant.prior else 'off'})")
    trained = ex.train_variant(variant, out, bundle=base, callbacks=callbacks)
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
    return DemoResult(path, trained, before_scores, after_scores)
