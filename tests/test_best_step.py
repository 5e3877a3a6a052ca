"""Evaluation while training (trainer/evaluation.py): the best step's weights are what is saved, PRES bounds the
choice, training can stop early, and a resumed run remembers its scores."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import CrashAt, config, images  # noqa: F401 (fixture)
from tests.tiny import tiny_bundle
from trainer.callbacks import Callbacks
from trainer.checkpoint import read_metadata, unet_to_ldm
from trainer.config import ConfigError
from trainer.evaluation import BestStep, Evaluation, StepScores
from trainer.loop import best_file_for, train


class Scripted(Evaluation):
    """Scores fixed per step (the scorer's job is tested elsewhere); still draws its samples as a real one does."""

    def __init__(self, fidelity: dict[int, float], pres: dict[int, float] | None = None):
        super().__init__(scorer=None, photos=[], prompts=["a zwx dog on the beach"], class_prompt="a dog", seeds=(0,))
        self.fidelity, self.pres, self.drawn = fidelity, pres or {}, []

    def score(self, step, draw):
        images = draw(["a zwx dog on the beach", "a dog"], [0, 0])
        assert len(images) == 2 and images[0].size == (32, 32)
        self.drawn.append(step)
        return StepScores(step, self.fidelity[step], self.pres.get(step, 0.2))


class UNetAtEachStep(Callbacks):
    def __init__(self, bundle):
        self.bundle, self.saved, self.scores = bundle, {}, []

    def on_step(self, info):
        self.saved[info.step] = {key: value.detach().half().clone() for key, value in unet_to_ldm(self.bundle.unet).items()}

    def on_evaluation(self, scores, best):
        self.scores.append((scores.step, best.best.step if best.best else None))


def output_unet(path) -> dict[str, torch.Tensor]:
    return {key: value for key, value in load_file(path).items() if key.startswith("model.diffusion_model.")}


def assert_holds_step(path, watcher, step):
    saved = output_unet(path)
    assert all(torch.equal(saved[key], watcher.saved[step][key]) for key in saved)
    other = step + 1 if step + 1 in watcher.saved else step - 1
    assert any(not torch.equal(saved[key], watcher.saved[other][key]) for key in saved)


def test_the_output_holds_the_best_evaluated_step_and_says_so(images, tmp_path):
    bundle = tiny_bundle("sd1")
    watcher = UNetAtEachStep(bundle)
    evaluation = Scripted({0: 0.1, 1: 0.3, 2: 0.6, 3: 0.5, 4: 0.4})
    cfg = config(images, tmp_path, max_train_steps=4, evaluate_every=1)
    result = train(cfg, bundle=bundle, callbacks=watcher, evaluation=evaluation)
    assert evaluation.drawn == [0, 1, 2, 3, 4]  # step 0 (the base model) too
    assert (result.steps, result.saved_step) == (4, 2)
    assert_holds_step(result.output, watcher, 2)
    scores = json.loads(read_metadata(result.output)["dreambooth.evaluations"])
    assert [entry["step"] for entry in scores] == [0, 1, 2]  # up to the saved step
    assert scores[2]["subject_fidelity"] == 0.6
    assert read_metadata(result.output)["dreambooth.steps"] == "2"
    assert not best_file_for(cfg.output).exists()
    assert watcher.scores == [(0, None), (1, 1), (2, 2), (3, 2), (4, 2)]


def test_the_last_step_is_saved_when_it_is_best_and_no_best_file_stays(images, tmp_path):
    bundle = tiny_bundle("sd1")
    watcher = UNetAtEachStep(bundle)
    cfg = config(images, tmp_path, max_train_steps=4, evaluate_every=2)
    evaluation = Scripted({0: 0.1, 2: 0.3, 4: 0.6})
    result = train(cfg, bundle=bundle, callbacks=watcher, evaluation=evaluation)
    assert evaluation.drawn == [0, 2, 4] and result.saved_step == 4
    assert_holds_step(result.output, watcher, 4)
    assert not best_file_for(cfg.output).exists()


def test_a_step_whose_class_prompt_drifted_is_not_chosen(images, tmp_path):
    bundle = tiny_bundle("sd1")
    watcher = UNetAtEachStep(bundle)
    # Step 2 looks most like the subject, but "a dog" drifted (PRES 0.2 -> 0.5, over the 0.1 allowed).
    evaluation = Scripted({0: 0.1, 1: 0.3, 2: 0.9, 3: 0.5, 4: 0.4}, pres={0: 0.2, 2: 0.5})
    result = train(config(images, tmp_path, max_train_steps=4, evaluate_every=1), bundle=bundle, callbacks=watcher,
                   evaluation=evaluation)
    assert result.saved_step == 3
    assert_holds_step(result.output, watcher, 3)


def test_training_stops_once_fidelity_stops_rising(images, tmp_path):
    bundle = tiny_bundle("sd1")
    watcher = UNetAtEachStep(bundle)
    log = []
    callbacks = watcher
    callbacks.log = log.append
    evaluation = Scripted({0: 0.1, 1: 0.3, 2: 0.6, 3: 0.5, 4: 0.55, 5: 0.9, 6: 0.9})
    cfg = config(images, tmp_path, max_train_steps=6, evaluate_every=1, early_stop_patience=2)
    result = train(cfg, bundle=bundle, callbacks=callbacks, evaluation=evaluation)
    assert result.steps == 4 and result.saved_step == 2 and max(watcher.saved) == 4
    assert_holds_step(result.output, watcher, 2)
    assert any("Stopping early at step 4" in line and "since step 2" in line for line in log)


def test_a_crashed_run_resumes_with_its_scores_and_best_file(images, tmp_path):
    fidelity = {0: 0.1, 1: 0.3, 2: 0.6, 3: 0.5, 4: 0.4}
    cfg = config(images, tmp_path, max_train_steps=4, evaluate_every=1, checkpoint_every=2)
    bundle = tiny_bundle("sd1")
    watcher = UNetAtEachStep(bundle)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crash = CrashAt(3)
        crash.on_evaluation = watcher.on_evaluation
        original_on_step = crash.on_step
        crash.on_step = lambda info: (watcher.on_step(info), original_on_step(info))
        train(cfg, bundle=bundle, callbacks=crash, evaluation=Scripted(fidelity))
    assert best_file_for(cfg.output).exists()  # a usable model of step 2 while nothing else is written
    resumed = Scripted(fidelity)
    result = train(cfg, bundle=tiny_bundle("sd1"), evaluation=resumed)
    assert result.resumed_from == 2 and resumed.drawn == [3, 4]  # the scores of steps 0-2 came from the state
    assert result.saved_step == 2 and [s.step for s in result.evaluations] == [0, 1, 2, 3, 4]
    assert_holds_step(result.output, watcher, 2)


def test_evaluation_needs_its_models_and_patience_needs_evaluation(images, tmp_path):
    with pytest.raises(ConfigError, match="evaluate_every: needs embedding models"):
        train(config(images, tmp_path, evaluate_every=2), bundle=tiny_bundle("sd1"))
    with pytest.raises(ConfigError, match="early_stop_patience: needs evaluate_every"):
        train(config(images, tmp_path, early_stop_patience=2), bundle=tiny_bundle("sd1"))


def test_best_step_rules():
    best = BestStep(max_pres_rise=0.1)
    assert best.best is None and not best.stalled(1)
    assert not best.add(StepScores(0, 0.9, 0.30))  # the base model is the baseline, never the choice
    assert best.add(StepScores(100, 0.5, 0.35))
    assert not best.add(StepScores(200, 0.8, 0.41))  # fidelity up, but PRES rose 0.11 > 0.1
    assert best.add(StepScores(300, 0.6, 0.40))
    assert not best.add(StepScores(400, 0.6, 0.30))  # a tie keeps the earlier step
    assert best.best.step == 300 and best.stalled(1) and not best.stalled(2)
    assert BestStep.from_list(0.1, best.to_list()).best == best.best
