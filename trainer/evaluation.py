"""Scoring the model while it trains, and which step was best.

Every `evaluate_every` steps the loop draws fixed-seed samples of the subject in a few contexts and of the plain class
prompt, and scores them against photos of the subject as the DreamBooth paper does: subject fidelity (mean similarity
of the subject samples to the photos: DINO, else CLIP-I) and PRES (the same for the class samples: how much "a dog"
has turned into your dog). The best step is the one with the highest subject fidelity whose PRES has not risen more
than `max_pres_rise` above the base model's (step 0); training may stop once fidelity has not improved for
`early_stop_patience` evaluations. Which embedder does the scoring is the caller's: the toy world's evaluators, or the
real ones (trainer/embedders.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

from PIL import Image

# Recontextualization prompts from the paper's evaluation list: the subject somewhere it never was in the photos.
CONTEXTS = ("a {subject} in the jungle", "a {subject} in the snow", "a {subject} on the beach",
            "a {subject} on top of a wooden floor")
SEEDS = (0, 1)


class ImageScorer(Protocol):
    """has_pres (optional, default True): False for a scorer that cannot measure PRES (CLIP without DINO)."""

    def subject_fidelity(self, images: Sequence[Image.Image], reference_images: Sequence[Image.Image]) -> float:
        """Mean similarity of `images` to the subject's `reference_images` (higher = more like the subject)."""

    def pres(self, class_images: Sequence[Image.Image], subject_images: Sequence[Image.Image]) -> float:
        """Mean similarity of plain class samples to the subject (lower = less language drift)."""


@dataclass(frozen=True)
class StepScores:
    step: int
    subject_fidelity: float
    pres: float | None  # None: not measured (no DINO model)


@dataclass
class Evaluation:
    """What is drawn and what it is scored against."""
    scorer: ImageScorer
    photos: list[Image.Image]  # the subject: its training photos, or held-out views where there are some
    prompts: list[str]  # the subject in contexts, e.g. "a zwx dog in the snow"
    class_prompt: str  # "a dog"
    seeds: tuple[int, ...] = SEEDS
    # How the samples are drawn: fewer steps than a preview, with a sampler that converges in few (DPM-Solver++),
    # because scoring runs every evaluate_every steps and must stay a small part of the run's time.
    sampler: str = "dpmpp_2m"
    steps: int = 12
    guidance: float = 7.5

    @classmethod
    def in_contexts(cls, scorer: ImageScorer, photos: list[Image.Image], subject: str, class_prompt: str,
                    prompts: Sequence[str] = ()) -> "Evaluation":
        """The given prompts, or the subject (e.g. "zwx dog") in the paper's contexts."""
        return cls(scorer, photos, list(prompts) or [context.format(subject=subject) for context in CONTEXTS],
                   class_prompt)

    def score(self, step: int, draw: Callable[[list[str], list[int]], list[Image.Image]]) -> StepScores:
        """Draw the samples with draw(prompts, seeds) (one image per pair, in one call) and score them."""
        prompts = [prompt for prompt in (*self.prompts, self.class_prompt) for _ in self.seeds]
        images = draw(prompts, [seed for _ in range(len(self.prompts) + 1) for seed in self.seeds])
        subject, plain = images[:-len(self.seeds)], images[-len(self.seeds):]
        pres = float(self.scorer.pres(plain, self.photos)) if getattr(self.scorer, "has_pres", True) else None
        return StepScores(step, float(self.scorer.subject_fidelity(subject, self.photos)), pres)


@dataclass
class BestStep:
    """The evaluations so far, and which step is best."""
    max_pres_rise: float
    history: list[StepScores] = field(default_factory=list)

    @property
    def pres_limit(self) -> float | None:
        """PRES may rise this far: the first evaluation's (the base model's, at step 0) plus max_pres_rise (None when PRES
    is not measured)."""
        if not self.history or self.history[0].pres is None:
            return None
        return self.history[0].pres + self.max_pres_rise

    @property
    def best(self) -> StepScores | None:
        limit = self.pres_limit
        allowed = [scores for scores in self.history
                   if scores.step > 0 and (limit is None or scores.pres is None or scores.pres <= limit)]
        return max(allowed, key=lambda scores: (scores.subject_fidelity, -scores.step), default=None)

    def add(self, scores: StepScores) -> bool:
        """Record an evaluation; True when it is the new best step."""
        self.history.append(scores)
        return self.best is scores

    def stalled(self, patience: int) -> bool:
        """The last `patience` trained evaluations brought no new best (patience 0: never)."""
        trained = [scores.step for scores in self.history if scores.step > 0]
        best = self.best
        return patience > 0 and best is not None and len([s for s in trained if s > best.step]) >= patience

    def to_list(self) -> list[dict]:
        return [asdict(scores) for scores in self.history]

    @classmethod
    def from_list(cls, max_pres_rise: float, entries: list[dict]) -> "BestStep":
        return cls(max_pres_rise, [StepScores(**entry) for entry in entries])
