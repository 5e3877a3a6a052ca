"""A loss curve as a picture, drawn with PIL so the engine needs no plotting library."""
from __future__ import annotations

from PIL import Image, ImageDraw

BACKGROUND, GRID, RAW, SMOOTH, TEXT = (24, 24, 27), (60, 60, 66), (110, 140, 190), (255, 170, 60), (220, 220, 225)


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard draws it)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def _frame(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw, tuple[int, int, int, int]]:
    """A dark chart with five grid lines, its drawing handle and the plot box (left, top, right, bottom); the title
    goes above the box."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 8, 22, width - 8, height - 8
    for i in range(5):
        y = top + (bottom - top) * i / 4
        draw.line([(left, y), (right, y)], fill=GRID)
    return image, draw, (left, top, right, bottom)


def loss_curve(losses: list[float], width: int = 512, height: int = 256) -> Image.Image:
    """Per-step loss (thin) and its moving average (bold), steps on x, loss on y."""
    image, draw, (left, top, right, bottom) = _frame(width, height)
    if not losses:
        draw.text((left, 4), "no steps yet", fill=TEXT)
        return image
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0

    def point(i: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(1, len(losses) - 1))
        return x, bottom - (bottom - top) * (value - low) / span

    draw.line([point(i, v) for i, v in enumerate(losses)], fill=RAW, width=1)
    draw.line([point(i, v) for i, v in enumerate(smoothed(losses))], fill=SMOOTH, width=2)
    draw.text((left, 4), f"loss over {len(losses)} steps   min {low:.4f}   max {high:.4f}   "
                         f"last (smoothed) {smoothed(losses)[-1]:.4f}", fill=TEXT)
    return image


FIDELITY, PRES, BEST = (120, 200, 120), (230, 110, 110), (255, 220, 90)


def evaluation_curve(history, best_step: int | None, pres_limit: float | None, width: int = 512,
                     height: int = 256) -> Image.Image:
    """Subject fidelity (green, up is better) and PRES (red, down is better) at each evaluated step, the PRES limit
    (dashed) and the best step (a yellow line): why the saved step was chosen. `history`: StepScores in step order."""
    image, draw, (left, top, right, bottom) = _frame(width, height)
    if not history:
        draw.text((left, 4), "no evaluations yet", fill=TEXT)
        return image
    values = [s.subject_fidelity for s in history] + [s.pres for s in history if s.pres is not None] + \
        ([pres_limit] if pres_limit is not None else [])
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    last = max(s.step for s in history) or 1

    def point(step: int, value: float) -> tuple[float, float]:
        return left + (right - left) * step / last, bottom - (bottom - top) * (value - low) / span

    if best_step is not None:
        x = point(best_step, low)[0]
        draw.line([(x, top), (x, bottom)], fill=BEST, width=1)
    if pres_limit is not None:
        y = point(0, pres_limit)[1]
        for x in range(left, right, 12):
            draw.line([(x, y), (min(x + 6, right), y)], fill=PRES)
    for values_of, color in ((lambda s: s.subject_fidelity, FIDELITY), (lambda s: s.pres, PRES)):
        points = [point(s.step, values_of(s)) for s in history if values_of(s) is not None]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([(x - 2, y - 2), (x + 2, y + 2)], fill=color)
    best = f"best step {best_step}" if best_step is not None else "no step within the PRES limit yet"
    draw.text((left, 4), f"subject fidelity (green) and PRES (red) at {len(history)} evaluations; {best}", fill=TEXT)
    return image
