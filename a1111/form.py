"""The DreamBooth tab's settings: their names (the Train node's inputs), defaults and help (the engine's), and how a
filled-in form becomes a TrainConfig. No WebUI import: the tab, the API and the tests share it."""
from __future__ import annotations

import base64
import binascii
import io
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

from PIL import Image, UnidentifiedImageError

from ..trainer.checkpoint import output_path
from ..trainer.config import ATTENTIONS, OPTIMIZERS, PRECISIONS, TrainConfig
from ..trainer.hosts import in_host_words, require_class_noun
from ..trainer.presets import PRESET_NAMES
from ..trainer.prompts import instance_prompt


@dataclass(frozen=True)
class Field:
    name: str  # the Train node's input of the same meaning, and the API's key
    label: str
    setting: str  # the TrainConfig field it sets: its default and help come from there unless given
    default: object = None
    choices: tuple = ()
    help: str = ""


_ENGINE = {f.name: f for f in fields(TrainConfig)}


def _field(name, label, setting="", default=None, choices=(), help_text="") -> Field:
    setting = setting or name
    spec = _ENGINE.get(setting)
    default = default if default is not None else (spec.default if spec else "")
    return Field(name, label, setting, default, tuple(choices), help_text or (spec.metadata["help"] if spec else ""))


# In the tab's order. Defaults that differ from the command line's are the nodes' (a GPU user's sensible start).
FIELDS = (
    _field("ckpt_name", "Base checkpoint", "base_model", help_text="The WebUI checkpoint to personalize (SD 1.x, "
           "2.x or SDXL, .safetensors); which of them it is is read from the file."),
    _field("instance_folder", "Photo folder", "instance_dir", help_text="A folder with 3-5 photos of your subject; "
           "used when no photos are uploaded."),
    _field("identifier", "Identifier"),
    _field("class_noun", "Class noun", default="dog"),
    _field("num_class_images", "Class images", help_text="How many class images of 'a [class noun]' to generate "
           "(cached: the next run with the same model and noun reuses them) when no class folder is given."),
    _field("class_folder", "Class image folder", "class_dir"),
    _field("steps", "Steps", "max_train_steps"),
    _field("learning_rate", "Learning rate"),
    _field("prior_loss_weight", "Prior loss weight", help_text="Weight of the class-image loss (lambda; the paper "
           "uses 1.0). 0 turns prior preservation off."),
    _field("train_text_encoder", "Train the text encoder"),
    _field("resolution", "Resolution"),
    _field("batch_size", "Batch size"),
    _field("memory_preset", "Memory preset", default="auto", choices=PRESET_NAMES),
    _field("optimizer", "Optimizer", choices=OPTIMIZERS),
    _field("attention", "Attention", choices=ATTENTIONS),
    _field("gradient_checkpointing", "Gradient checkpointing", default=True),
    _field("precision", "Precision", "mixed_precision", choices=PRECISIONS),
    _field("fused_backward", "Fused backward"),
    _field("bf16_weights", "bf16 weights"),
    _field("seed", "Seed"),
    _field("output_name", "Output name", "output", default="zwx-dog", help_text="File name (no folders) under "
           "models/Stable-diffusion/dreambooth/."),
    _field("sample_prompt", "Sample prompt", "sample_prompts", default="", help_text="Prompt of the preview images; "
           "empty = '[instance prompt] on the beach'."),
    _field("overwrite", "Overwrite"),
    _field("evaluate_every", "Evaluate every"),
    _field("early_stop_patience", "Early-stop patience"),
)
DEFAULTS = {f.name: f.default for f in FIELDS}
LABELS = {f.name: f.label for f in FIELDS}
# The engine's setting names -> the tab's labels, for its messages (as the nodes rename them to their inputs). Only
# names that cannot be plain words ("max_train_steps"): "seed" or "optimizer" in a sentence stay as they are.
RENAMES = {**{f.setting: f.label for f in FIELDS if "_" in f.setting}, "output:": f"{LABELS['output_name']}:"}
COMMANDS = {"pick-token": "the Pick rare token button"}


def words(message: str) -> str:
    """An engine message in the tab's words."""
    return in_host_words(message, RENAMES, COMMANDS)


class Host(Protocol):
    """What the form needs from the WebUI (a1111/webui.py; a stand-in in the tests)."""

    def checkpoint_path(self, name: str) -> str: ...
    def output_folder(self) -> Path: ...
    def work_folder(self) -> Path: ...
    def device(self) -> str: ...


class FormError(ValueError):
    """A setting the tab cannot use; the message names its label and the fix."""


def train_config(values: dict, host: Host, photos: list | None = None) -> TrainConfig:
    """The run the form asks for. `photos`: uploaded files (paths, or PIL images from the API), copied into a folder
    of their own under the WebUI's outputs so that Train again finds the same photos and resumes."""
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise FormError(f"Unknown setting(s) {', '.join(unknown)}; the settings are: {', '.join(DEFAULTS)}.")
    v = {**DEFAULTS, **values}
    class_noun = require_class_noun(str(v["class_noun"]), LABELS["class_noun"])
    output = output_path(host.output_folder(), str(v["output_name"]))
    instance_dir = str(v["instance_folder"]).strip()
    if photos:
        instance_dir = str(_keep_photos(photos, host.work_folder() / "photos" / output.stem))
    elif not instance_dir:
        raise FormError("No photos of the subject: upload 3-5 photos, or give the folder that holds them as "
                        f"'{LABELS['instance_folder']}'.")
    if not str(v["ckpt_name"]).strip():
        raise FormError(f"No base checkpoint: choose one as '{LABELS['ckpt_name']}'.")
    identifier = str(v["identifier"]).strip()
    prompt = str(v["sample_prompt"]).strip() or f"{instance_prompt(identifier, class_noun)} on the beach"
    return TrainConfig(
        base_model=host.checkpoint_path(str(v["ckpt_name"])), instance_dir=instance_dir, identifier=identifier,
        class_noun=class_noun, output=str(output), overwrite=bool(v["overwrite"]),
        with_prior_preservation=float(v["prior_loss_weight"]) > 0, prior_loss_weight=float(v["prior_loss_weight"]),
        class_dir=str(v["class_folder"]).strip(), num_class_images=int(v["num_class_images"]),
        prior_cache_dir=str(host.work_folder() / "class-images"), resolution=int(v["resolution"]),
        batch_size=int(v["batch_size"]), max_train_steps=int(v["steps"]), learning_rate=float(v["learning_rate"]),
        train_text_encoder=bool(v["train_text_encoder"]), memory_preset=str(v["memory_preset"]),
        optimizer=str(v["optimizer"]), attention=str(v["attention"]),
        gradient_checkpointing=bool(v["gradient_checkpointing"]), mixed_precision=str(v["precision"]),
        fused_backward=bool(v["fused_backward"]), bf16_weights=bool(v["bf16_weights"]), seed=int(v["seed"]),
        device=host.device(), sample_prompts=[prompt], evaluate_every=int(v["evaluate_every"]),
        early_stop_patience=int(v["early_stop_patience"]),
    ).validate()


def _keep_photos(photos: list, folder: Path) -> Path:
    """The uploaded photos, and only they, in `folder` (a photo of an earlier upload would join the training)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, photo in enumerate(photos):
        if isinstance(photo, (str, Path)):
            shutil.copy(photo, folder / f"{i:02d}-{Path(photo).name}")
        else:
            photo.save(folder / f"{i:02d}.png")
    return folder


def decode_photo(data: str, index: int) -> Image.Image:
    """A base64 image, as the WebUI's own API takes them (with or without a data: prefix)."""
    try:
        raw = base64.b64decode(str(data).split(",", 1)[-1], validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image
    except (binascii.Error, UnidentifiedImageError, OSError) as error:
        raise FormError(f"Photo {index + 1} of instance_images is not a base64-encoded image ({error}); send PNG or "
                        "JPEG bytes in base64.") from error
