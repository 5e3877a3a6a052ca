"""Nothing lost, nothing confusing: what a careful new user meets on the command line, each case checked before any
work is done or answered with one clear line (no traceback), and no file left half-written."""
import errno
import io
import logging
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import trainer.api
import trainer.loop
import trainer.output
import trainer.state
from tests.tiny import one_thread, tiny_bundle  # noqa: F401  (autouse: one torch thread in this module)
from trainer.__main__ import Progress, main
from trainer.checkpoint import save_checkpoint
from trainer.config import ConfigError, TrainConfig
from trainer.locking import exclusive
from trainer.quiet import install as install_quiet


@pytest.fixture(scope="module")
def base_model(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def train_args(base_model, photos, out, *extra):
    return ["train", "--model", str(base_model), "--images", str(photos), "--class-dir", str(photos),
            "--identifier", "zwx", "--class-noun", "dog", "--output", str(out), "--resolution", "32",
            "--max-train-steps", "2", "--num-class-images", "2", "--optimizer", "adamw", *extra]


def test_the_base_model_is_never_the_output(base_model):
    cfg = TrainConfig(base_model=str(base_model), identifier="zwx", class_noun="dog", output=str(base_model))
    with pytest.raises(ConfigError, match="is the base model itself"):
        cfg.validate()


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(base_model, photos, tmp_path, capsys,
                                                                            monkeypatch):
    steps = []
    monkeypatch.setattr(trainer.loop, "_fine_tune", lambda *a, **k: steps.append(1))

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)  # (root could write into a 0555 folder)
    assert main(train_args(base_model, photos, tmp_path / "ro" / "out.safetensors")) == 2
    err = capsys.readouterr().err
    assert "cannot write into" in err and "Permission denied" in err and "Traceback" not in err and not steps
    monkeypatch.undo()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(train_args(base_model, photos, blocker / "out.safetensors")) == 2  # a file where a folder must be
    assert "cannot write into" in capsys.readouterr().err


def test_too_little_disk_space_is_refused_before_training(base_model, photos, tmp_path, capsys, monkeypatch):
    class Usage:
        free = 1000

    monkeypatch.setattr(trainer.output.shutil, "disk_usage", lambda path: Usage())
    monkeypatch.setattr(trainer.loop, "_fine_tune", lambda *a, **k: pytest.fail("trained anyway"))
    assert main(train_args(base_model, photos, tmp_path / "out.safetensors")) == 2
    assert "saving needs about" in capsys.readouterr().err


def test_a_full_disk_at_the_final_save_is_one_line_and_leaves_no_temporary_files(base_model, photos, tmp_path,
                                                                                   capsys, monkeypatch):
    out = tmp_path / "run" / "out.safetensors"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.loop, "save_checkpoint", disk_full)
    monkeypatch.setattr(trainer.state, "save_file", disk_full)  # the finished state does not fit either
    assert main(train_args(base_model, photos, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no .state.tmp, no stray temp file, no lock


def test_an_interrupted_state_save_keeps_the_previous_state(tmp_path, monkeypatch):
    directory = tmp_path / "out.state"
    module = torch.nn.Linear(2, 2)
    position = trainer.state.Position(1, [0], 1)
    trainer.state.save_finished_state(directory, fingerprint="a", position=position, modules={"m": module}, losses=[])

    def second_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.state, "save_file", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.state.save_finished_state(directory, fingerprint="b", position=position, modules={"m": module},
                                          losses=[])
    assert trainer.state.read_state_meta(directory)["fingerprint"] == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.state"]


def test_a_second_ctrl_c_ends_the_command_with_a_message_not_a_traceback(base_model, photos, tmp_path, capsys,
                                                                          monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.loop, "_fine_tune", interrupted)
    assert main(train_args(base_model, photos, tmp_path / "out.safetensors")) == 130
    assert "Interrupted" in capsys.readouterr().err


def test_two_runs_never_train_into_the_same_output(base_model, photos, tmp_path):
    out = tmp_path / "out.safetensors"
    cfg = TrainConfig(base_model=str(base_model), instance_dir=str(photos), class_dir=str(photos), identifier="zwx",
                      class_noun="dog", output=str(out), resolution=32, max_train_steps=1, num_class_images=2,
                      optimizer="adamw", device="cpu")
    with exclusive(out):  # the first run, still training
        with pytest.raises(ConfigError, match="another run is training into"):
            trainer.loop.train(cfg)
    trainer.loop.train(cfg)  # once it has finished, the output is free again
    assert out.is_file() and not (tmp_path / "out.safetensors.lock").exists()


def test_an_output_from_other_settings_is_replaced_only_when_asked(base_model, photos, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert main(train_args(base_model, photos, out)) == 0
    first = out.read_bytes()
    assert main(train_args(base_model, photos, out)) == 0  # the same run again may replace its own output
    assert main(train_args(base_model, photos, out, "--learning-rate", "1e-5")) == 2
    assert "already exists and was trained from other settings" in capsys.readouterr().err
    assert main(train_args(base_model, photos, out, "--learning-rate", "1e-5", "--overwrite")) == 0
    assert out.read_bytes() != first
    foreign = tmp_path / "foreign.safetensors"
    save_checkpoint(tiny_bundle("sd1"), foreign, {})
    assert main(train_args(base_model, photos, foreign)) == 2
    assert "was not made by a DreamBooth Studio run" in capsys.readouterr().err


def test_train_help_reads_well_and_shows_the_defaults_of_switches(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "about 20% slower" in text and "%%" not in text
    assert "--gradient-checkpointing, --no-gradient-checkpointing" in text and "(default: off)" in text
    assert "--overwrite" in text


def test_priors_and_train_share_one_class_image_cache(base_model, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["priors", "--model", str(base_model), "--class-noun", "dog", "--count", "2", "--steps", "2"]) == 0
    made = sorted((tmp_path / "cache" / "dreambooth-studio" / "class-images").rglob("*.png"))
    assert len(made) == 2
    stamps = [p.stat().st_mtime_ns for p in made]
    args = train_args(base_model, photos, tmp_path / "out.safetensors", "--resolution", "16", "--prior-steps", "2")
    args.remove("--class-dir")
    args.remove(str(photos))
    assert main(args) == 0  # the same class images at the same size: train finds them in the same cache
    assert [p.stat().st_mtime_ns for p in made] == stamps


def test_library_noise_is_dropped_and_nothing_else(caplog):
    install_quiet()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from x")
        logging.getLogger("transformers.utils.import_utils").warning("`X` requires torchvision (not installed); y")
        logging.getLogger("diffusers.models.modeling_utils").warning(
            "There are modules in UNet2DConditionModel that should be kept in float32: []. Casting...")
        logging.getLogger("diffusers.models.modeling_utils").warning("something that matters")
    assert [record.getMessage() for record in caplog.records] == ["something that matters"]


def test_known_words_and_too_few_photos_are_warned_about(base_model, photos, tmp_path, capsys):
    args = train_args(base_model, photos, tmp_path / "out.safetensors")
    args[args.index("zwx")] = "sks"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Warning: 'sks' is blocked" in out and "pick-token" in out
    one = tmp_path / "one"
    one.mkdir()
    (one / "0.png").write_bytes((photos / "0.png").read_bytes())
    args = train_args(base_model, one, tmp_path / "out2.safetensors")
    args[args.index("zwx")] = "dog"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Warning: 'dog' is a real word" in out and "Warning: 1 photo of the subject" in out


def test_sample_names_files_by_prompt_and_draws_at_the_models_own_size(base_model, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(base_model), "--prompt", "a zwx dog, on the beach!", "--count", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["000-a-zwx-dog-on-the-beach-seed0.png", "001-a-zwx-dog-on-the-beach-seed1.png"]
    bundle = tiny_bundle("sd1")
    native = bundle.unet.config.sample_size * bundle.vae_scale_factor  # 16 px for the tiny model, 512 for SD 1.5
    assert Image.open(out / names[0]).size == (native, native)


def test_sample_into_an_unwritable_folder_and_ctrl_c_in_sample(base_model, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["sample", "--model", str(base_model), "--prompt", "a dog", "--out", str(blocker / "x")]) == 2
    assert "--out: cannot write into" in capsys.readouterr().err
    real = trainer.api.sample_images

    def stop_after_first(bundle, prompts, *, on_image, **kwargs):
        real(bundle, prompts[:1], on_image=on_image, **{**kwargs, "seeds": kwargs["seeds"][:1]})
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.api, "sample_images", stop_after_first)
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(base_model), "--prompt", "a dog", "--count", "3", "--steps", "2",
                 "--out", str(out)]) == 130
    assert "1 of 3 images are in" in capsys.readouterr().err and len(list(out.glob("*.png"))) == 1


class FakeTerminal(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_is_a_bar_on_a_terminal_and_a_few_lines_in_a_log():
    log = FakeTerminal(tty=False)
    bar = Progress("Class images", 200, stream=log)
    for done in range(1, 201):
        bar.update(done)
    lines = log.getvalue().splitlines()
    assert lines == [f"Class images {done}/200" for done in (1, *range(20, 201, 20))]  # the start, then each tenth
    terminal = FakeTerminal(tty=True)
    bar = Progress("Training", 4, stream=terminal)
    bar.update(2, "loss 0.1")
    assert terminal.getvalue() == "\rTraining [############............] 2/4 loss 0.1  "
    bar.update(4)
    assert terminal.getvalue().endswith("[########################] 4/4  \n")



