"""The toy experiment's plumbing: prompts in each variant's words, photos the ordinary loader accepts, and the
step sweep's premise (measuring inside a run does not change it)."""
from dataclasses import replace

import torch

from trainer.dataset import load_image_folder
from trainer.models import load_model
from trainer.toy import experiment as ex
from trainer.toy import world


def test_variant_prompts_put_identifier_and_noun_where_the_template_has_them():
    template = "a blue {V} star on a white background"
    assert ex.Variant("a").prompt(template) == f"a blue {ex.RARE_IDENTIFIER} star on a white background"
    assert ex.Variant("b", class_noun="heart").prompt(template) == f"a blue {ex.RARE_IDENTIFIER} heart on a white background"
    assert ex.Variant("c", class_noun="").prompt(template) == f"a blue {ex.RARE_IDENTIFIER} on a white background"
    assert ex.Variant("d", identifier="striped").prompt("a sketch of a {V} star") == "a sketch of a striped star"


def test_prompt_fidelity_judges_the_noun_the_variant_says():
    truth = world.EVAL_PROMPTS[3][1]  # a blue {V} star on a white background
    assert ex.Variant("a").named(truth)["shape"] == "star"
    assert ex.Variant("b", class_noun="heart").named(truth)["shape"] == "heart"
    assert "shape" not in ex.Variant("c", class_noun="").named(truth)
    assert ex.Variant("a").named(truth)["color"] == "blue"


def test_config_runs_the_ordinary_engine_on_photos_the_loader_accepts(tmp_path):
    paths = ex.write_photos(tmp_path / "photos")
    assert len(paths) == len(world.subject_views("train"))
    assert len(load_image_folder(str(tmp_path / "photos"))) == len(paths)  # >= 64 px, as real photos must be
    cfg = ex.train_config(ex.Variant("x", class_noun="", prior=False), tmp_path)
    cfg.validate()
    assert cfg.instance_prompt == f"a {ex.RARE_IDENTIFIER}" and not cfg.with_prior_preservation


def test_step_k_of_a_measured_run_equals_a_k_step_run(tmp_path):
    torch.set_num_threads(1)
    variant = ex.Variant("sweep", steps=4, num_class_images=4)
    seen = []

    long_run = load_model(ex.BASE)

    def visit(step):
        seen.append(step)
        ex.sample_images(long_run, ["a star"], seeds=[0], **ex.SAMPLING)  # what a measurement does mid-run
        if step == 2:
            snapshot.update({k: v.clone() for k, v in long_run.unet.state_dict().items()})

    snapshot = {}
    ex.train_variant(variant, tmp_path, bundle=long_run, callbacks=ex.AtSteps([2], visit))
    short = ex.train_variant(replace(variant, name="short", steps=2), tmp_path)
    assert seen == [2]
    short_weights = short.unet.state_dict()
    assert all(torch.equal(snapshot[k], short_weights[k]) for k in snapshot)
    assert any(not torch.equal(snapshot[k], v) for k, v in long_run.unet.state_dict().items())  # it went on
