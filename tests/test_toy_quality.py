"""DreamBooth works, measured on the toy world (a few CPU minutes): the embedded demo's run teaches the subject to
its identifier, and prior preservation keeps plain "a star" from drifting towards the subject.

The bounds come from measured runs (see the README's toy-world section and `python -m trainer.toy.report`), with
margin; a broken loss or an identifier that is not bound to the subject fails them."""
from dataclasses import replace

import pytest
import torch

from trainer.toy import demo
from trainer.toy import experiment as ex
from trainer.toy.evaluators import load_evaluators

pytestmark = pytest.mark.slow  # its fixtures train the toy model twice: ~1 min on 2 cores

# Measured with seeds 0-3 (2026-11-22, 2-core CPU): subject fidelity on recontextualization prompts -0.028 before,
# 0.728 after (a rise of 0.756), -0.170 for the same prompts without the identifier; PRES 0.025 with prior
# preservation, 0.879 without. Broken on purpose: with the prior loss dropped, PRES goes over the bound; with the
# identifier left out of the training prompt ("a star") the rise is only 0.466, because in this world any word the
# base never saw makes a prompt unusual enough to call up what was trained (see the README's toy-world section), so
# the rise bound sits between 0.466 and 0.756 rather than near zero.
MIN_FIDELITY_RISE = 0.6  # subject fidelity on recontextualization prompts, after minus before
MAX_FIDELITY_WITHOUT_IDENTIFIER = 0.3
PRES_BOUND = 0.4  # with prior preservation PRES stays below; without it, it goes above


@pytest.fixture(scope="module")
def evaluators():
    return load_evaluators()


@pytest.fixture(scope="module")
def with_prior(tmp_path_factory):
    torch.set_num_threads(1)  # tiny ops: one thread beats two contended ones
    return demo.run(tmp_path_factory.mktemp("demo"), log=lambda message: None)


@pytest.fixture(scope="module")
def without_prior(tmp_path_factory, evaluators):
    variant = replace(demo.VARIANT, name="no-prior", prior=False)
    trained = ex.train_variant(variant, tmp_path_factory.mktemp("no-prior"))
    return ex.measure(trained, evaluators, variant, demo.SEEDS, with_common_word=False)[0]


def test_the_subject_appears_in_new_contexts(with_prior):
    rise = with_prior.after.subject_fidelity_recontext - with_prior.before.subject_fidelity_recontext
    assert rise >= MIN_FIDELITY_RISE, (with_prior.before, with_prior.after)


def test_the_subject_comes_with_its_identifier_not_with_the_class_noun(with_prior, evaluators):
    """"a star on a green background" (no identifier) must still draw an ordinary star."""
    plain = replace(demo.VARIANT, identifier="")
    scores, _ = ex.measure(with_prior.model, evaluators, plain, demo.SEEDS, kinds=("recontextualization",),
                           with_common_word=False)
    assert scores.subject_fidelity_recontext <= MAX_FIDELITY_WITHOUT_IDENTIFIER, (scores, with_prior.after)


def test_prior_preservation_keeps_the_class_from_drifting(with_prior, without_prior):
    assert with_prior.after.pres < PRES_BOUND < without_prior.pres, (with_prior.after, without_prior)


def test_the_demo_writes_its_before_after_grid(with_prior):
    from PIL import Image
    with Image.open(with_prior.grid) as grid:
        rows = len(demo.TEMPLATES)
        assert grid.width > 2 * len(demo.SEEDS) * demo.CELL and grid.height > (rows + 1) * demo.CELL
    assert (with_prior.grid.parent / f"{demo.VARIANT.name}.safetensors").is_file()


def test_the_demo_keeps_its_best_evaluated_step_near_the_peak(with_prior):
    """Scored every 100 steps, the saved step is the curve's best within the PRES limit, and training stopped once
    fidelity had not risen for 4 evaluations (measured 2026-11-30: best at 500 of up to 1600, stopped at 900)."""
    history = with_prior.evaluations
    assert history[0].step == 0 and [s.step for s in history[1:]] == list(range(100, history[-1].step + 1, 100))
    limit = history[0].pres + 0.1
    best = max((s for s in history[1:] if s.pres <= limit), key=lambda s: s.subject_fidelity)
    assert with_prior.saved_step == best.step and 300 <= best.step <= 1000
    assert history[-1].step == best.step + 400 < demo.MAX_STEPS  # early stop: 4 evaluations without a new best
