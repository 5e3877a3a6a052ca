"""The command line end to end on a tiny checkpoint file: every sub-command a new user would run."""

import pytest
from PIL import Image

from trainer.__main__ import main
from trainer.checkpoint import read_metadata


@pytest.fixture(scope="module")
def base_model(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def photos(subject_photos):
    return subject_photos(dog=2, cat=2)


@pytest.mark.parametrize("command", ["pick-token", "priors", "train", "sample"])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text and "--model" in text


def test_train_then_sample(base_model, photos, tmp_path, capsys):
    out = tmp_path / "zwx-dog.safetensors"
    code = main(["train", "--model", str(base_model), "--images", str(photos / "dog"),
                 "--class-dir", str(photos / "cat"), "--identifier", "zwx", "--class-noun", "dog",
                 "--output", str(out), "--resolution", "32", "--max-train-steps", "2", "--num-class-images", "2",
                 "--optimizer", "adamw", "--learning-rate", "1e-4"])
    assert code == 0, capsys.readouterr().err
    assert read_metadata(out)["modelspec.trigger_phrase"] == "a zwx dog"
    assert "a zwx dog" in capsys.readouterr().out

    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(out), "--prompt", "a zwx dog", "--count", "2", "--size", "32",
                 "--steps", "2", "--out", str(samples)]) == 0
    pngs = sorted(samples.glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (32, 32) for p in pngs)


def test_pick_token_lists_ranked_identifiers(base_model, capsys):
    assert main(["pick-token", "--model", str(base_model), "--class-noun", "dog", "--count", "3",
                 "--candidates", "12", "--shortlist", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("identifier"))
    rows = [line.split() for line in lines[header + 1:header + 4]]
    strengths = [float(row[1]) for row in rows]
    assert strengths == sorted(strengths) and all(row[0].isalpha() for row in rows)
    assert f"--identifier {rows[0][0]}" in lines[-1]


def test_priors_are_cached(base_model, tmp_path, capsys):
    args = ["priors", "--model", str(base_model), "--class-noun", "dog", "--count", "2", "--size", "32",
            "--steps", "2", "--cache", str(tmp_path)]
    assert main(args) == 0
    pngs = sorted(tmp_path.rglob("*.png"))
    assert len(pngs) == 2
    stamps = [p.stat().st_mtime_ns for p in pngs]
    assert main(args) == 0  # a second run reuses the cache
    assert [p.stat().st_mtime_ns for p in pngs] == stamps


def test_a_pickle_is_refused_with_advice(photos, tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    code = main(["train", "--model", str(ckpt), "--images", str(photos / "dog"), "--identifier", "zwx",
                 "--class-noun", "dog", "--output", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "model.ckpt" in err and "pickle" in err.lower()


def test_train_with_evaluation_scores_each_step_with_real_embedders_and_draws_the_curve(base_model, photos, tmp_path,
                                                                                         capsys, tiny_dino_folder):
    import json
    out = tmp_path / "zwx-dog.safetensors"
    code = main(["train", "--model", str(base_model), "--images", str(photos / "dog"),
                 "--class-dir", str(photos / "cat"), "--identifier", "zwx", "--class-noun", "dog",
                 "--output", str(out), "--resolution", "32", "--max-train-steps", "2", "--num-class-images", "2",
                 "--optimizer", "adamw", "--learning-rate", "1e-4", "--sample-steps", "2", "--evaluate-every", "1",
                 "--evaluation-models", str(tiny_dino_folder)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert [line.split(":")[0] for line in printed.out.splitlines() if line.startswith("Step ")] == \
        ["Step 0", "Step 1", "Step 2"]
    assert "PRES 0." in printed.out  # a DINO model: PRES is measured
    assert Image.open(tmp_path / "zwx-dog.evaluation.png").size == (512, 256)
    scores = json.loads(read_metadata(out)["dreambooth.evaluations"])
    assert scores[0]["step"] == 0 and all(-1 <= entry["subject_fidelity"] <= 1 for entry in scores)


def test_evaluation_without_models_says_what_to_give(base_model, photos, tmp_path, capsys):
    code = main(["train", "--model", str(base_model), "--images", str(photos / "dog"), "--identifier", "zwx",
                 "--class-noun", "dog", "--output", str(tmp_path / "o.safetensors"), "--evaluate-every", "50"])
    assert code == 2 and "--evaluation-models" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_dino_folder(tmp_path_factory):
    """A tiny random DINO ViT in transformers' folder layout, as a user would put the paper's dino-vits16."""
    import json

    import torch
    from transformers import ViTConfig, ViTModel
    folder = tmp_path_factory.mktemp("models") / "dino-vits16"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": 32, "width": 32}, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "image_processor_type": "ViTImageProcessor"}))
    return folder.parent


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    import torch

    from tests.tiny import tiny_bundle
    from trainer.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("models") / "tiny-sdxl.safetensors"
    save_checkpoint(tiny_bundle("sdxl"), path, {}, dtype=torch.float32)
    return path


def test_sdxl_sample_and_priors_draw_at_the_models_own_size(sdxl_model, tmp_path):
    import numpy as np

    from trainer.models import load_model
    from trainer.sampling import native_size, sample_images

    bundle = load_model(sdxl_model)
    size = native_size(bundle)  # 16 for the tiny SDXL (1024 for SDXL itself)
    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(sdxl_model), "--prompt", "a dog", "--count", "2", "--steps", "2",
                 "--seed", "5", "--out", str(samples)]) == 0
    pngs = sorted(samples.glob("*.png"))
    expected = sample_images(bundle, ["a dog"] * 2, seeds=[5, 6], steps=2, width=size, height=size)
    assert [np.asarray(Image.open(p)).tobytes() for p in pngs] == [np.asarray(e).tobytes() for e in expected]

    assert main(["priors", "--model", str(sdxl_model), "--class-noun", "dog", "--count", "1", "--steps", "2",
                 "--cache", str(tmp_path / "priors")]) == 0
    assert [Image.open(p).size for p in (tmp_path / "priors").rglob("*.png")] == [(size, size)]
