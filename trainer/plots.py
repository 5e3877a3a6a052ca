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


def loss_curve(losses: list[float], width: int = 512, height: int = 256) -> Image.Image:
    """Per-step loss (thin) and its moving average (bold), steps on x, loss on y."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 8, 22, width - 8, height - 8
    for i in range(5):
        y = top + (bottom - top) * i / 4
        draw.line([(left, y), (right, y)], fill=GRID)
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
