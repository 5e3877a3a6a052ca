"""Hooks through which a caller (the command line, a ComfyUI node, a test) watches and steers a run."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepInfo:
    step: int  # steps done so far (1-based after the first step)
    total: int
    loss: float
    instance_loss: float
    prior_loss: float
    lr: float
    elapsed_s: float  # wall time of this process's steps
    eta_s: float  # estimated time left


class Callbacks:
    """No-op defaults; override what you need."""

    def on_step(self, info: StepInfo) -> None:
        pass

    def should_stop(self) -> bool:
        """Asked before every step; True cancels the run after saving a resumable state."""
        return False

    def on_samples(self, step: int, images: list) -> None:
        """Preview images (PIL) made every `sample_every` steps and at the end."""

    def on_evaluation(self, scores, best) -> None:
        """With evaluate_every: a step's StepScores and the BestStep record so far (trainer/evaluation.py)."""

    def on_progress(self, what: str, done: int, total: int) -> None:
        """Progress of work before the steps, e.g. ("Class images", 37, 200)."""

    def log(self, message: str) -> None:
        pass


class TrainingCancelled(Exception):
    """The caller asked to stop; the state saved at `step` can be resumed by running the same config again."""

    def __init__(self, step: int, state_dir: str):
        super().__init__(f"training cancelled at step {step}; resumable state kept in {state_dir}")
        self.step = step
        self.state_dir = state_dir
