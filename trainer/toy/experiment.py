"""DreamBooth on the toy world, measured: what the report, the demo and the quality test share.

A `Variant` is one DreamBooth setting (identifier, class noun, prior preservation, steps). `train_variant` runs it
through the ordinary engine (`trainer.loop.train`, photos from a folder, class images generated and cached by the
base model), exactly as a user's run; `measure` samples the evaluation prompts and scores them with the shipped
evaluators (trainer.toy.evaluators).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..callbacks import Callbacks, StepInfo
from ..config import TrainConfig
from ..dataset import to_training_tensor
from ..evaluation import SEEDS, Evaluation
from ..loop import train
from ..bundle import ModelBundle
from ..models import load_model
from ..sampling import image_grid, sample_images
from . import world
from .evaluators import Evaluators, named_attributes

BASE = Path(__file__).with_name("base.safetensors")
RESOLUTION = 32
PHOTO_SIZE = 64  # the photo loader refuses photos under 64 px (as for real photos); training resizes to 32
# `python -m trainer pick-token --model trainer/toy/base.safetensors --class-noun star` ranked it first before the pool
# dropped the words of every language (rab is Hungarian and Turkish; itas ranks first now). The toy world's captions
# never use it, which is all the experiment needs.
RARE_IDENTIFIER = "rab"
RUNNERS_UP = ("joao", "oul", "nings", "ying")  # that list's 2nd to 5th: words the training never saw either
# A word the base model knows well (a pattern of this world): what the paper warns against using as the identifier.
COMMON_WORD = "striped"
WRONG_NOUN = "heart"

# Sampling for every measurement and grid: deterministic DDIM, one seed per image.
SAMPLING = {"steps": 20, "guidance": 5.0, "sampler": "ddim", "width": RESOLUTION, "height": RESOLUTION}
# Scoring while training draws 2 seeds at 10 DDIM steps, a quarter of a measurement's cost, so that it adds under 15% to
# a run scored every 100 steps: the demo's curve and best step are those of 4 seeds at 20 steps (6 steps is too few).
EVALUATION_STEPS = 10


@dataclass(frozen=True)
class Variant:
    name: str
    identifier: str = RARE_IDENTIFIER
    class_noun: str = world.SUBJECT_SHAPE  # "" = no class noun in the prompts
    prior: bool = True
    steps: int = 400
    learning_rate: float = 1e-4  # the base was pretrained at 2e-3: about the ratio of SD's 5e-6 to its 1e-4
    num_class_images: int = 100
    seed: int = 0

    @property
    def subject_phrase(self) -> str:
        return " ".join(word for word in (self.identifier, self.class_noun) if word)

    def prompt(self, template: str) -> str:
        """An evaluation template ("a {V} star on a green background") in this variant's words."""
        return template.replace("{V} " + world.SUBJECT_SHAPE, self.subject_phrase)

    def named(self, truth: world.Scene) -> dict[str, str]:
        """What this variant's prompt for `truth` names (its own class noun, or no shape without one); the
        subject's identity is not among them: subject fidelity judges that."""
        named = named_attributes(truth)
        if self.class_noun:
            named["shape"] = self.class_noun
        else:
            del named["shape"]
        return named


def write_photos(folder: Path) -> list[Path]:
    """The subject's training views, as the PNG photos a user would drop in a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, scene) in enumerate(world.subject_views("train", size=PHOTO_SIZE)):
        path = folder / f"{index + 1:02d}-{scene.background}.png"
        image.save(path)
        paths.append(path)
    return paths


def train_config(variant: Variant, workdir: Path, base: Path = BASE) -> TrainConfig:
    phrase = variant.subject_phrase
    return TrainConfig(
        base_model=str(base), instance_dir=str(workdir / "photos"), identifier=variant.identifier,
        class_noun=variant.class_noun or "thing", instance_prompt=f"a {phrase}",
        class_prompt=f"a {variant.class_noun}" if variant.class_noun else "",
        output=str(workdir / f"{variant.name}.safetensors"), with_prior_preservation=variant.prior,
        num_class_images=variant.num_class_images, prior_cache_dir=str(workdir / "priors"), prior_steps=20,
        prior_guidance=SAMPLING["guidance"], resolution=RESOLUTION, max_train_steps=variant.steps,
        learning_rate=variant.learning_rate, optimizer="adamw", device="cpu", mixed_precision="no",
        save_dtype="fp32", resume=False, seed=variant.seed)


class AtSteps(Callbacks):
    """Calls `visit(step)` after each of `steps`: with a constant learning rate, step k of a long run is a k-step
    run (tests/test_toy_experiment.py), so one run measures a whole sweep."""

    def __init__(self, steps: list[int], visit: Callable[[int], None]):
        self.steps, self.visit = set(steps), visit

    def on_step(self, info: StepInfo) -> None:
        if info.step in self.steps:
            self.visit(info.step)


def evaluation(variant: Variant, evaluators: Evaluators, seeds: tuple[int, ...] = SEEDS,
               steps: int = EVALUATION_STEPS) -> Evaluation:
    """Scoring while training, with the toy evaluators: the recontextualization prompts against the held-out views
    (as measure() scores subject fidelity on new backgrounds), and the plain class prompt for PRES."""
    prompts = [variant.prompt(t) for t, _ in world.EVAL_PROMPTS if world.EVAL_PROMPT_KINDS[t] == "recontextualization"]
    return Evaluation(evaluators, [image for image, _ in world.subject_views("heldout")], prompts, world.CLASS_PROMPT,
                      seeds, sampler=SAMPLING["sampler"], steps=steps, guidance=SAMPLING["guidance"])


def train_variant(variant: Variant, workdir: Path, base: Path = BASE, bundle: ModelBundle | None = None,
                  callbacks: Callbacks | None = None) -> ModelBundle:
    """DreamBooth of the toy subject into `base` (or the already loaded `bundle`) with `variant`'s setting, through
    the ordinary engine; returns the trained model, also written to workdir/<name>.safetensors."""
    if not (workdir / "photos").is_dir():
        write_photos(workdir / "photos")
    bundle = bundle or load_model(base)
    train(train_config(variant, workdir, base), bundle=bundle, callbacks=callbacks)
    return bundle


@dataclass
class Scores:
    subject_fidelity: float  # identity-embedding similarity to held-out views, all evaluation prompts
    subject_fidelity_recontext: float  # the same on the recontextualization prompts only
    prompt_fidelity: float  # attribute agreement with what each evaluation prompt names
    pres: float  # identity similarity of plain "a star" samples to the subject (lower = less drift)
    div: float  # perceptual diversity among samples of one prompt
    common_word_kept: float  # attribute agreement on prompts that use COMMON_WORD in its ordinary sense

    def row(self) -> list[float]:
        return [self.subject_fidelity, self.subject_fidelity_recontext, self.prompt_fidelity, self.pres, self.div,
                self.common_word_kept]


COLUMNS = ["subject fidelity ↑", "subject fidelity (recontext.) ↑", "prompt fidelity ↑", "PRES ↓", "DIV ↑",
           f"'{COMMON_WORD}' kept ↑"]

# Ordinary prompts with the common word in its world meaning; no subject in them.
COMMON_WORD_PROMPTS = [
    (f"a {COMMON_WORD} circle on a blue background", {"shape": "circle", "pattern": COMMON_WORD, "background": "blue"}),
    (f"a {COMMON_WORD} star on a white background", {"shape": "star", "pattern": COMMON_WORD, "background": "white"}),
    (f"a {COMMON_WORD} heart on a black background", {"shape": "heart", "pattern": COMMON_WORD, "background": "black"}),
]


def _samples(bundle: ModelBundle, prompts: list[str], seeds: list[int]) -> list[list]:
    flat = sample_images(bundle, [p for p in prompts for _ in seeds], seeds=[s for _ in prompts for s in seeds],
                         batch_size=32, **SAMPLING)
    return [flat[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]


def measure(bundle: ModelBundle, evaluators: Evaluators, variant: Variant, seeds: list[int],
            kinds: tuple[str, ...] = ("recontextualization", "property", "style"), with_common_word: bool = True
            ) -> tuple[Scores, dict[str, list]]:
    """Scores of `bundle` on the evaluation prompts in `variant`'s words, and the samples by prompt."""
    prompts = [(t, truth) for t, truth in world.EVAL_PROMPTS if world.EVAL_PROMPT_KINDS[t] in kinds]
    texts = [variant.prompt(t) for t, _ in prompts] + [world.CLASS_PROMPT]
    if with_common_word:
        texts += [text for text, _ in COMMON_WORD_PROMPTS]
    samples = dict(zip(texts, _samples(bundle, texts, seeds)))
    heldout = [image for image, _ in world.subject_views("heldout")]
    by_prompt = [samples[variant.prompt(t)] for t, _ in prompts]
    recontext = [images for (t, _), images in zip(prompts, by_prompt)
                 if world.EVAL_PROMPT_KINDS[t] == "recontextualization"]
    scores = Scores(
        subject_fidelity=float(np.mean([evaluators.subject_fidelity(images, heldout) for images in by_prompt])),
        subject_fidelity_recontext=float(np.mean([evaluators.subject_fidelity(images, heldout)
                                                  for images in recontext])) if recontext else float("nan"),
        prompt_fidelity=float(np.mean([evaluators.prompt_fidelity(images, variant.named(truth))
                                       for (_, truth), images in zip(prompts, by_prompt)])),
        pres=evaluators.pres(samples[world.CLASS_PROMPT], heldout),
        div=float(np.mean([evaluators.div(images) for images in by_prompt])),
        common_word_kept=float(np.mean([evaluators.prompt_fidelity(samples[text], truth)
                                        for text, truth in COMMON_WORD_PROMPTS])) if with_common_word
        else float("nan"))
    return scores, samples


def real_image_fidelity(evaluators: Evaluators) -> float:
    """Subject fidelity of the real training photos to the held-out views: the ceiling (the paper's 'Real Images')."""
    return evaluators.subject_fidelity([image for image, _ in world.subject_views("train")],
                                       [image for image, _ in world.subject_views("heldout")])


@torch.no_grad()
def autoencoded_fidelity(bundle: ModelBundle, evaluators: Evaluators) -> float:
    """Subject fidelity of the held-out views after the VAE's encode/decode to the originals: the most any sample
    can reach through this VAE."""
    heldout = [image for image, _ in world.subject_views("heldout")]
    pixels = torch.stack([to_training_tensor(image, RESOLUTION) for image in heldout])
    decoded = bundle.vae.decode(bundle.vae.encode(pixels).latent_dist.mean).sample
    return evaluators.subject_fidelity((decoded.clamp(-1, 1) + 1) / 2, heldout)


def samples_grid(samples: dict[str, list], scale: int = 3):
    """One row per prompt, one column per seed, enlarged (nearest neighbour) so 32 px images can be seen."""
    rows = list(samples.values())
    grid = image_grid([image for row in rows for image in row], len(rows[0]))
    return grid.resize((grid.width * scale, grid.height * scale), 0)

