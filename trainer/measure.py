"""Measuring a trained subject with the paper's metrics: which embedders to use, which images go into which metric,
and the result as a table (text and image). The metrics themselves are in fidelity.py, the models in embedders.py.

Which images count (the paper's sec. 4.1):
- `photos`: the real photos of the subject (the training photos, or better, held-out ones);
- `generated`: images of prompts with the subject's identifier ("a zwx dog on the beach"), each with its prompt:
  DINO, CLIP-I and CLIP-T;
- `class_samples`: the trained model's samples of the plain class prompt ("a dog"): PRES.
For CLIP-T the identifier is taken out of the prompt ("a zwx dog on the beach" -> "a dog on the beach"): it is a
made-up word to CLIP, and what the prompt asks for is the rest.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageOps

from . import embedders, fidelity
from .dataset import IMAGE_EXTENSIONS
from .embedders import CLIP, DINO, Embedder, EmbedderError, ModelInfo

PICKLED = (".bin", ".pt", ".pth", ".ckpt")
WHERE_DINO = ("the paper's DINO ViT-S/16 (Hugging Face facebook/dino-vits16: config.json, "
              "preprocessor_config.json, and model.safetensors from its refs/pr/1 revision) into {home}/dino-vits16/; "
              "a DINOv2 (facebook/dinov2-small) works too")
WHERE_CLIP = ("a full CLIP (Hugging Face openai/clip-vit-large-patch14: config.json, model.safetensors, "
              "preprocessor_config.json) into {home}/clip-vit-large-patch14/; a CLIP vision .safetensors (ComfyUI's "
              "models/clip_vision, IP-Adapter's image encoders) gives CLIP-I but not CLIP-T")


# --- finding and choosing the models -------------------------------------------------------------------------------

@dataclass
class Embedders:
    """The models a measurement uses (None where there is none), and what was passed over and why."""
    dino: Embedder | None = None
    clip: Embedder | None = None
    notes: list[str] = field(default_factory=list)
    home: str = "the models folder"  # where a missing model should go, for the messages

    def to(self, device: str) -> "Embedders":
        for model in (self.dino, self.clip):
            if model is not None:
                model.to(device)
        return self


def find_models(sources: Sequence[str | Path]) -> tuple[list[ModelInfo], list[str]]:
    """Every embedding model in `sources` (.safetensors files, transformers folders, or folders holding them, two
    levels deep), and a note for each thing there that is not one (pickled weights, other models)."""
    found, notes = [], []

    def visit(path: Path, depth: int) -> None:
        if path.is_dir() and not (path / "config.json").is_file():
            if depth < 2:
                for child in sorted(path.iterdir()):
                    if not child.name.startswith("."):
                        visit(child, depth + 1)
            return
        if path.is_file() and path.suffix.lower() not in (".safetensors", *PICKLED):
            return
        try:
            found.append(embedders.identify(path))
        except EmbedderError as error:
            notes.append(str(error))

    for source in sources:
        source = Path(source)
        if not source.exists():
            notes.append(f"{source} does not exist")
        else:
            visit(source, 0)
    return found, notes


def _size(info: ModelInfo) -> int:
    files = info.path.glob("*.safetensors") if info.path.is_dir() else [info.path]
    return sum(f.stat().st_size for f in files)


def choose(found: Sequence[ModelInfo], kind: str) -> ModelInfo | None:
    """The model `auto` picks: for DINO the paper's ViT-S/16, else DINO v1, else DINOv2; for CLIP one with its text
    tower (CLIP-T needs it); then the smallest (the quickest, and the closest to the paper's base-size models)."""
    candidates = [info for info in found if info.kind == kind]
    if kind == DINO:
        return min(candidates, key=lambda i: (not i.is_papers, i.family != "vit", _size(i), str(i.path)), default=None)
    return min(candidates, key=lambda i: (not i.text, _size(i), str(i.path)), default=None)


def load_embedders(sources: Sequence[str | Path], dino: str | Path = "auto", clip: str | Path = "auto",
                   home: str = "the models folder") -> Embedders:
    """Load the DINO and CLIP models: "auto" picks among the models in `sources` (`choose`), "none" leaves that kind
    out, a path loads that file or folder. `home` is where measure()'s messages tell the user to put a missing
    model; `notes` says what in `sources` was passed over and why."""
    found, notes = find_models(sources)
    result = Embedders(notes=notes, home=home)
    for kind, wanted in ((DINO, dino), (CLIP, clip)):
        if wanted == "none":
            continue
        info = choose(found, kind) if wanted == "auto" else embedders.identify(wanted)
        if info is None:  # measure() says which metrics that skips and where the model goes
            continue
        if info.kind != kind:
            raise EmbedderError(f"{info.path} is a {info.label}, not a {kind.upper()} model")
        setattr(result, kind, embedders.load(info))
    return result


# --- the images ----------------------------------------------------------------------------------------------------

def read_images(folder: str | Path) -> tuple[list[Image.Image], list[str | None], list[str]]:
    """The images in `folder` (sorted by name), each one's prompt (None where it has none), and their file names.
    A prompt is the text file beside the image (`001.png` -> `001.txt`), else the PNG's A1111/Forge `parameters`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of images")
    paths = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS)[:6])}...)")
    images, prompts = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                parameters = image.info.get("parameters")
                images.append(ImageOps.exif_transpose(image).convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"{path} cannot be read as an image ({error}); re-export it or remove it") from None
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            prompts.append(sidecar.read_text(encoding="utf-8").strip() or None)
        elif isinstance(parameters, str):  # "prompt\nNegative prompt: ...\nSteps: ..."
            prompts.append(re.split(r"\n(?:Negative prompt:|Steps:)", parameters)[0].strip() or None)
        else:
            prompts.append(None)
    return images, prompts, [p.name for p in paths]


def assign_prompts(text: str, count: int) -> list[str | None]:
    """Prompts typed one per line -> one per image: no line, none; one line, every image; else each line for an
    equal run of consecutive images (8 images, 2 lines: images 1-4 the first, 5-8 the second)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return [None] * count
    if count % len(lines):
        raise ValueError(f"prompts: {len(lines)} lines for {count} images; give one prompt for all images, one per "
                         f"image, or one per equal run of consecutive images (a number of lines that divides {count})")
    return [line for line in lines for _ in range(count // len(lines))]


def without_identifier(prompt: str, identifier: str) -> str:
    """The prompt as CLIP-T reads it: 'a zwx dog on the beach' -> 'a dog on the beach'."""
    if not identifier.strip():
        return prompt
    return " ".join(re.sub(rf"(?<!\w){re.escape(identifier.strip())}(?!\w)", " ", prompt).split())


# --- the measurement -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    metric: str  # DINO, CLIP-I, CLIP-T, PRES, DIV
    value: float | None  # None: skipped
    better: str  # "higher" or "lower"
    model: str = ""  # the embedder's name
    images: str = ""  # which images went in
    note: str = ""  # why it was skipped, or what was left out


def measure(photos: Sequence[Image.Image], generated: Sequence[Image.Image] = (),
            prompts: Sequence[str | None] = (), class_samples: Sequence[Image.Image] = (),
            models: Embedders | None = None, identifier: str = "") -> list[Row]:
    """DINO, CLIP-I, CLIP-T, PRES and DIV as the paper defines them (see the module's notes), with the models there
    are; a metric that cannot be computed is a row with value None and the reason."""
    models = models or Embedders()
    if not photos:
        raise ValueError("no photos of the subject to compare with")
    prompts = list(prompts) or [None] * len(generated)
    if len(prompts) != len(generated):
        raise ValueError(f"{len(generated)} generated images but {len(prompts)} prompts")
    missing = {kind: f"no {kind.upper()} model: put {where.format(home=models.home)}"
               for kind, where in ((DINO, WHERE_DINO), (CLIP, WHERE_CLIP))}
    cache = {}

    def embedded(model: Embedder, images: Sequence[Image.Image]):  # each set once per model
        if (model.kind, id(images)) not in cache:
            cache[model.kind, id(images)] = model.embed_images(images)
        return cache[model.kind, id(images)]

    rows = []
    for metric, kind, model in (("DINO", DINO, models.dino), ("CLIP-I", CLIP, models.clip)):
        if model is None:
            rows.append(Row(metric, None, "higher", note=missing[kind]))
        elif not generated:
            rows.append(Row(metric, None, "higher", model.name, note="no generated images"))
        else:
            value = fidelity.subject_fidelity(embedded(model, generated), embedded(model, photos))
            rows.append(Row(metric, value, "higher", model.name, f"{len(generated)} generated x {len(photos)} photos"))
    rows.append(_clip_t(models, generated, prompts, identifier, lambda: embedded(models.clip, generated)))
    if models.dino is None:
        rows.append(Row("PRES", None, "lower", note="needs a DINO model, as DINO does"))
    elif not class_samples:
        rows.append(Row("PRES", None, "lower", models.dino.name,
                        note='no class samples: give the trained model\'s samples of "a [class noun]"'))
    else:
        value = fidelity.pres(embedded(models.dino, class_samples), embedded(models.dino, photos))
        rows.append(Row("PRES", value, "lower", models.dino.name,
                        f"{len(class_samples)} class samples x {len(photos)} photos"))
    rows.append(Row("DIV", None, "higher", note=fidelity.DIV_SKIPPED))
    return rows


def _clip_t(models: Embedders, generated, prompts, identifier: str, embedded_generated) -> Row:
    clip = models.clip
    if clip is None:
        return Row("CLIP-T", None, "higher", note="needs a CLIP model, as CLIP-I does")
    if not clip.has_text:
        return Row("CLIP-T", None, "higher", clip.name,
                   note=f"{clip.name} is a CLIP image encoder only; CLIP-T needs the text half too: put "
                        f"{WHERE_CLIP.format(home=models.home)}")
    with_prompt = [i for i, prompt in enumerate(prompts) if prompt]
    if not generated:
        return Row("CLIP-T", None, "higher", clip.name, note="no generated images")
    if not with_prompt:
        return Row("CLIP-T", None, "higher", clip.name, note="no generated image has a prompt")
    texts = [without_identifier(prompts[i], identifier) for i in with_prompt]
    value = fidelity.prompt_fidelity(embedded_generated()[with_prompt], clip.embed_texts(texts))
    left_out = len(generated) - len(with_prompt)
    return Row("CLIP-T", value, "higher", clip.name, f"{len(with_prompt)} images with their prompts",
               f"{left_out} images without a prompt left out" if left_out else "")


# --- the table -----------------------------------------------------------------------------------------------------

def table_lines(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    """The table's cells, header first: metric, score, better, model, images."""
    cells = [("metric", "score", "better", "model", "images")]
    for row in rows:
        score = f"{row.value:.4f}" if row.value is not None else "skipped"
        cells.append((row.metric, score, row.better, row.model, row.images))
    return cells


def table_text(rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    """The table as aligned text, then why each skipped metric was skipped, and `notes` (e.g. models passed over)."""
    cells = table_lines(rows)
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    text += [f"{row.metric}: {row.note}" for row in rows if row.note]
    text += [f"note: {note}" for note in notes]
    return "\n".join(text)


def table_image(rows: Sequence[Row]) -> Image.Image:
    """The table as a small picture (scores only; the reasons are in the text)."""
    from .plots import BACKGROUND, GRID, TEXT

    cells = table_lines(rows)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(int(probe.textlength(line[i])) for line in cells) + 16 for i in range(len(cells[0]))]
    line_height, pad = 18, 8
    image = Image.new("RGB", (sum(widths) + 2 * pad, line_height * len(cells) + 2 * pad), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for r, line in enumerate(cells):
        y = pad + r * line_height
        if r == 1:
            draw.line([(pad, y - 2), (image.width - pad, y - 2)], fill=GRID)
        x = pad
        for cell, width in zip(line, widths):
            draw.text((x, y + 2), cell, fill=TEXT if r else (255, 170, 60))
            x += width
    return image


# --- for training: the scorer the loop's evaluation asks for ---------------------------------------------------------

class EmbeddingScorer:
    """Subject fidelity (DINO, else CLIP-I) and PRES (DINO) for trainer/evaluation.py's ImageScorer, on real models.
    The photos' embeddings are computed once and kept (keyed by the images' pixels)."""

    def __init__(self, models: Embedders):
        self.model = models.dino or models.clip
        if self.model is None:
            raise EmbedderError(f"no DINO or CLIP model to score with: put {WHERE_DINO.format(home=models.home)}")
        self.has_pres = models.dino is not None
        self.metric = "DINO" if self.has_pres else "CLIP-I"
        self.home = models.home
        self._cache: dict[str, object] = {}

    def _reference(self, images: Sequence[Image.Image]):
        key = hashlib.sha256(b"".join(image.tobytes() + repr(image.size).encode() for image in images)).hexdigest()
        if key not in self._cache:
            self._cache[key] = self.model.embed_images(images)
        return self._cache[key]

    def subject_fidelity(self, images: Sequence[Image.Image], reference_images: Sequence[Image.Image]) -> float:
        return fidelity.subject_fidelity(self.model.embed_images(images), self._reference(reference_images))

    def pres(self, class_images: Sequence[Image.Image], subject_images: Sequence[Image.Image]) -> float:
        if not self.has_pres:
            raise EmbedderError(f"PRES needs a DINO model: put {WHERE_DINO.format(home=self.home)}")
        return fidelity.pres(self.model.embed_images(class_images), self._reference(subject_images))
