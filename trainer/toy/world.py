"""A toy world of captioned images with known ground truth, for measuring DreamBooth honestly without SD weights.

Every image is one shape (a class noun) of one colour, maybe striped or dotted, large or small, in one of five
places, on a plain coloured background; or a pencil sketch of it on white paper. Captions say exactly that in plain
English, with one fixed grammar:

    a|an [small] [striped|dotted] <colour> <shape> [on the left|on the right|at the top|at the bottom] on a <bg> background
    a sketch of a|an [small] [striped|dotted] <shape> [on the left|...]

("an" before a vowel: "an orange star"; the identifier never changes the article: "a {V} star").

("large", "plain" and "center" are the defaults and are not said.) A sketch is a dark graphite outline on
off-white paper: its colour and background are not drawn and not said.

The subject (`Scene(subject=True)`) is one particular star with an identity no caption word describes: a
teal eye with a black pupil set off-centre towards its upper-right arm, and the tip of its upper-left arm in
white. Its body colour is SUBJECT_COLOR unless a property prompt changes it; the marking stays. The pretraining
`dataset` never contains it; `subject_views("train")` are the 5 photos a user would give DreamBooth and
`subject_views("heldout")` are 8 more for evaluation. EVAL_PROMPTS are the paper's kinds of prompt
(recontextualization, property modification, art style) with the ground truth each image should show.

Pure Python + PIL + numpy; everything is deterministic in its arguments (no global random state).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

# Class nouns, each a single CLIP token (a test checks it).
SHAPES = ("circle", "square", "triangle", "star", "heart")

# Colour words (single CLIP tokens) -> RGB.
COLORS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 165, 55),
    "blue": (35, 70, 215),
    "purple": (135, 45, 165),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# Background colour words; "gray" is a background only.
BACKGROUNDS = ("white", "black", "gray", "blue", "green", "yellow", "red", "purple")
PALETTE = {**COLORS, "gray": (128, 128, 128)}

PATTERNS = ("plain", "striped", "dotted")
POSITIONS = ("center", "left", "right", "top", "bottom")
SIZES = ("small", "large")
STYLES = ("photo", "sketch")

POSITION_PHRASES = {"center": "", "left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom"}
# Where the shape's centre goes (fractions of the image side, x then y) and its radius, before jitter.
RADIUS = {"large": 0.36, "small": 0.2}
_DIRECTIONS = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}

# Sketch style: graphite on paper.
PAPER_RGB = (243, 240, 232)
GRAPHITE_RGB = (45, 45, 50)

# The subject: a star whose marking no caption word describes.
SUBJECT_SHAPE = "star"
SUBJECT_COLOR = "orange"
MARK_EYE_RGB = (0, 175, 165)  # teal: no colour word in this world names it
MARK_PUPIL_RGB = (15, 15, 15)
MARK_TIP_RGB = (250, 250, 250)

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    pattern: str = "plain"
    position: str = "center"
    size: str = "large"
    style: str = "photo"
    subject: bool = False

    def __post_init__(self):
        for value, allowed, name in ((self.shape, SHAPES, "shape"), (self.color, COLORS, "color"),
                                     (self.background, BACKGROUNDS, "background"), (self.pattern, PATTERNS, "pattern"),
                                     (self.position, POSITIONS, "position"), (self.size, SIZES, "size"),
                                     (self.style, STYLES, "style")):
            if value not in allowed:
                raise ValueError(f"Scene {name} must be one of {tuple(allowed)}, got {value!r}")
        if self.subject and self.shape != SUBJECT_SHAPE:
            raise ValueError(f"the subject is a {SUBJECT_SHAPE}, got shape {self.shape!r}")


def rgb(name: str) -> tuple[int, int, int]:
    """RGB of a colour or background word."""
    return PALETTE[name]


# --- captions -----------------------------------------------------------------------------------------------------

def caption(scene: Scene, identifier: str = "{V}") -> str:
    """The plain-English caption of a scene. A subject scene names its identifier before the class noun
    ("a {V} star on a blue background"), and its colour only when it is not the subject's own
    ("a blue {V} star on a white background")."""
    noun = f"{identifier} {scene.shape}" if scene.subject else scene.shape
    words = ["small"] if scene.size == "small" else []
    if scene.pattern != "plain":
        words.append(scene.pattern)
    if scene.style == "photo" and not (scene.subject and scene.color == SUBJECT_COLOR):
        words.append(scene.color)
    words.append(noun)
    article = "an" if words[0][0] in "aeiou" and not (scene.subject and len(words) == 1) else "a"
    text = ("a sketch of " if scene.style == "sketch" else "") + f"{article} " + " ".join(words)
    if POSITION_PHRASES[scene.position]:
        text += " " + POSITION_PHRASES[scene.position]
    if scene.style == "photo":
        text += f" on a {scene.background} background"
    return text


# --- rendering ----------------------------------------------------------------------------------------------------

def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline of a shape as a polygon (circle included), rotated by `angle` radians about its centre."""
    if shape == "circle":
        pts = [(math.cos(2 * math.pi * i / 64), math.sin(2 * math.pi * i / 64)) for i in range(64)]
    elif shape == "square":
        s = 0.82
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(math.cos(math.radians(a)), math.sin(math.radians(a)) + 0.15) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = [((1.0 if i % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * i)),
                (1.0 if i % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * i)) + 0.05) for i in range(10)]
    elif shape == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -y / 17.0 + 0.1))
    else:
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _mask(size: int, draw_fn) -> np.ndarray:
    image = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(image))
    return np.asarray(image, dtype=np.float32) / 255.0


def _pattern_mask(pattern: str, big: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """1 where the pattern's second colour goes (in the shape's own rotated frame)."""
    if pattern == "plain":
        return np.zeros((big, big), np.float32)
    ys, xs = np.mgrid[0:big, 0:big].astype(np.float32) + 0.5
    c, s = math.cos(-angle), math.sin(-angle)
    u = ((xs - cx) * c - (ys - cy) * s) / r  # shape frame, radius 1
    v = ((xs - cx) * s + (ys - cy) * c) / r
    if pattern == "striped":  # three horizontal bands across the shape
        return ((np.floor((v + 1.0) / 0.36) % 2) == 1).astype(np.float32)
    dots = np.zeros_like(u)
    for du in (-0.5, 0.0, 0.5):  # a 3x3 grid of dots
        for dv in (-0.45, 0.05, 0.55):
            dots = np.maximum(dots, ((u - du) ** 2 + (v - dv) ** 2 < 0.16 ** 2).astype(np.float32))
    return dots


def _second_color(color: str, background: str) -> tuple[int, int, int]:
    """Stripes and dots: white on dark colours, black on light ones, never the background's colour (gray when
    the shape and background are black and white)."""
    order = ("black", "white") if color in ("white", "yellow", "orange") else ("white", "black")
    return PALETTE[next((name for name in order if name not in (color, background)), "gray")]


def _subject_marks(big: int, cx: float, cy: float, r: float, angle: float) -> dict[str, np.ndarray]:
    """Masks of the subject's marking: teal eye, black pupil (off-centre, towards the upper-right arm) and the
    white tip of the upper-left arm."""
    c, s = math.cos(angle), math.sin(angle)

    def at(x: float, y: float) -> tuple[float, float]:
        return cx + r * (x * c - y * s), cy + r * (x * s + y * c)

    def disk(x: float, y: float, radius: float) -> np.ndarray:
        px, py = at(x, y)
        rr = radius * r
        return _mask(big, lambda d: d.ellipse((px - rr, py - rr, px + rr, py + rr), fill=255))

    eye = disk(0.05, 0.0, 0.36)
    pupil = disk(0.17, -0.1, 0.16)
    # Upper-left arm: outer point at -162 degrees; its tip is the triangle from the outer point back to 60%.
    a = math.radians(-162)
    side = math.radians(18)
    tip_pts = [at(math.cos(a), math.sin(a) + 0.05),
               at(0.62 * math.cos(a - side / 3), 0.62 * math.sin(a - side / 3) + 0.05),
               at(0.62 * math.cos(a + side / 3), 0.62 * math.sin(a + side / 3) + 0.05)]
    tip = _mask(big, lambda d: d.polygon(tip_pts, fill=255))
    return {"eye": eye, "pupil": pupil, "tip": tip}


def _layout(scene: Scene, big: int, rng: random.Random) -> tuple[float, float, float, float]:
    radius = RADIUS[scene.size] * rng.uniform(0.92, 1.08)
    offset = max(0.5 - RADIUS[scene.size] - 0.05, 0.1)
    dx, dy = _DIRECTIONS[scene.position]
    x = 0.5 + dx * offset + rng.uniform(-0.04, 0.04)
    y = 0.5 + dy * offset + rng.uniform(-0.04, 0.04)
    angle = math.radians(rng.uniform(-12, 12))
    return x * big, y * big, radius * big, angle


def render(scene: Scene, size: int = 32, seed: int = 0) -> Image.Image:
    """The scene as a `size` x `size` RGB image. `seed` jitters position, size, rotation and lighting a little,
    so different seeds give different views of the same scene; the same (scene, size, seed) gives the same pixels."""
    rng = random.Random(f"toy-world:{seed}:{scene!r}")
    big = size * _SUPERSAMPLE
    cx, cy, r, angle = _layout(scene, big, rng)
    points = _shape_points(scene.shape, cx, cy, r, angle)
    shape = _mask(big, lambda d: d.polygon(points, fill=255))
    pattern = _pattern_mask(scene.pattern, big, cx, cy, r, angle) * shape
    marks = _subject_marks(big, cx, cy, r, angle) if scene.subject else {}

    canvas = np.empty((big, big, 3), np.float32)
    if scene.style == "photo":
        light = rng.uniform(0.94, 1.04)
        canvas[:] = np.clip(np.array(rgb(scene.background), np.float32) * light, 0, 255)
        layers = [(shape, COLORS[scene.color]), (pattern, _second_color(scene.color, scene.background))]
        layers += [(marks[k], v) for k, v in (("tip", MARK_TIP_RGB), ("eye", MARK_EYE_RGB),
                                              ("pupil", MARK_PUPIL_RGB)) if k in marks]
    else:
        canvas[:] = PAPER_RGB
        width = max(1, round(big / 26))
        outline = _mask(big, lambda d: d.line(points + points[:1], fill=255, width=width, joint="curve"))
        layers = [(outline, GRAPHITE_RGB), (pattern * 0.7, GRAPHITE_RGB)]
        if marks:  # the marking in pencil: eye outline, filled pupil, shaded tip
            ring = np.clip(marks["eye"] - _erode(marks["eye"], width), 0, 1)
            layers += [(ring, GRAPHITE_RGB), (marks["pupil"], GRAPHITE_RGB), (marks["tip"] * 0.6, GRAPHITE_RGB)]
    for mask, color in layers:
        canvas = canvas * (1 - mask[..., None]) + np.array(color, np.float32) * mask[..., None]
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    image = image.resize((size, size), Image.Resampling.BOX)
    if scene.style == "sketch":  # paper grain
        grain = np.random.default_rng(rng.getrandbits(32)).normal(0, 3.0, (size, size, 1))
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + grain + 0.5, 0, 255).astype(np.uint8))
    return image


def _erode(mask: np.ndarray, width: int) -> np.ndarray:
    out = mask.copy()
    for axis in (0, 1):
        for shift in range(1, width + 1):
            out = np.minimum(out, np.roll(mask, shift, axis))
            out = np.minimum(out, np.roll(mask, -shift, axis))
    return out


# --- data sets ----------------------------------------------------------------------------------------------------

def random_scene(rng: random.Random) -> Scene:
    """A scene from the pretraining distribution (never the subject): mostly large, centred, plain photos."""
    shape = rng.choice(SHAPES)
    color = rng.choice(list(COLORS))
    background = rng.choice([b for b in BACKGROUNDS if b != color])
    pattern = rng.choices(PATTERNS, weights=(6, 2, 2))[0]
    size = rng.choices(SIZES, weights=(3, 7))[0]
    position = rng.choices(POSITIONS, weights=(6, 1, 1, 1, 1))[0] if size == "small" else "center"
    style = rng.choices(STYLES, weights=(85, 15))[0]
    if style == "sketch":
        color, background = "black", "white"  # not drawn in a sketch: fixed so equal sketches are equal scenes
    return Scene(shape, color, background, pattern, position, size, style)


def dataset(n: int, seed: int = 0, size: int = 32) -> list[tuple[Image.Image, str, Scene]]:
    """n (image, caption, scene) examples for pretraining, deterministic in (n, seed, size); no subject in it."""
    rng = random.Random(f"toy-dataset:{seed}")
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        image = render(scene, size, seed=rng.getrandbits(31))
        out.append((image, caption(scene), scene))
    return out


# The subject's views: (scene, render seed). Training photos vary background, position and size; held-out views
# use other backgrounds and seeds.
_TRAIN_VIEWS = (
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "blue", subject=True), 11),
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "white", subject=True), 12),
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "gray", size="small", position="left", subject=True), 13),
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "black", subject=True), 14),
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "purple", size="small", position="top", subject=True), 15),
)
_HELDOUT_VIEWS = (
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "green", subject=True), 21),
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "yellow", subject=True), 22),
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "red", subject=True), 23),
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "blue", size="small", position="right", subject=True), 24),
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "white", size="small", position="bottom", subject=True), 25),
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "gray", subject=True), 26),
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "black", size="small", position="center", subject=True), 27),
    (Scene(SUBJECT_SHAPE, SUBJECT_COLOR, "purple", subject=True), 28),
)


def subject_views(split: str, size: int = 32) -> list[tuple[Image.Image, Scene]]:
    """The subject's photos: "train" (5 views for DreamBooth) or "heldout" (8 other views for evaluation)."""
    views = {"train": _TRAIN_VIEWS, "heldout": _HELDOUT_VIEWS}.get(split)
    if views is None:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [(render(scene, size, seed), scene) for scene, seed in views]


def plain_twin(scene: Scene) -> Scene:
    """The same scene without the subject's identity: an ordinary star of the same colour, place and size."""
    return replace(scene, subject=False)


# --- evaluation prompts -------------------------------------------------------------------------------------------

def _subject(color: str = SUBJECT_COLOR, background: str = "white", style: str = "photo") -> Scene:
    return Scene(SUBJECT_SHAPE, color, background, style=style, subject=True)


# (prompt template, ground truth). "{V}" is the identifier; the class noun is SUBJECT_SHAPE. Sketch ground truth has
# background "white" (paper) and the subject's own colour (not drawn).
EVAL_PROMPTS: list[tuple[str, Scene]] = [
    # recontextualization: backgrounds none of the training views had
    ("a {V} star on a green background", _subject(background="green")),
    ("a {V} star on a yellow background", _subject(background="yellow")),
    ("a {V} star on a red background", _subject(background="red")),
    # property modification: another body colour, the marking stays
    ("a blue {V} star on a white background", _subject("blue", "white")),
    ("a green {V} star on a black background", _subject("green", "black")),
    ("a purple {V} star on a yellow background", _subject("purple", "yellow")),
    ("a red {V} star on a gray background", _subject("red", "gray")),
    # art style
    ("a sketch of a {V} star", _subject(style="sketch")),
]
EVAL_PROMPT_KINDS: dict[str, str] = {
    EVAL_PROMPTS[0][0]: "recontextualization", EVAL_PROMPTS[1][0]: "recontextualization",
    EVAL_PROMPTS[2][0]: "recontextualization", EVAL_PROMPTS[3][0]: "property", EVAL_PROMPTS[4][0]: "property",
    EVAL_PROMPTS[5][0]: "property", EVAL_PROMPTS[6][0]: "property", EVAL_PROMPTS[7][0]: "style",
}
# The class prompt for prior preservation, and the instance prompt, in this world's grammar.
CLASS_PROMPT = f"a {SUBJECT_SHAPE}"
INSTANCE_PROMPT = "a {V} " + SUBJECT_SHAPE
