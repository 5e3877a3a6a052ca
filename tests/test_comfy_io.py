"""The node-side conversions, without ComfyUI."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.pack import pack_module
from tests.tiny import tiny_bundle
from trainer.callbacks import StepInfo
from trainer.checkpoint import read_trigger_phrase, save_checkpoint

comfy_io = pack_module("nodes.comfy_io")
image_batch_to_pil, pil_to_image_batch, folder_fingerprint = (comfy_io.image_batch_to_pil, comfy_io.pil_to_image_batch,
                                                              comfy_io.folder_fingerprint)
node_message, plain_errors = comfy_io.node_message, comfy_io.plain_errors
ConfigError, TrainConfig = pack_module("trainer.config").ConfigError, pack_module("trainer.config").TrainConfig
ImageError = pack_module("trainer.dataset").ImageError
OutOfMemory = pack_module("trainer.phases").OutOfMemory
TrainingCancelled = pack_module("trainer.callbacks").TrainingCancelled
PICK_ADVICE = pack_module("trainer.tokens").PICK_ADVICE
require_class_noun, StepLog = pack_module("trainer.hosts").require_class_noun, pack_module("trainer.hosts").StepLog


def test_image_batches_round_trip_exactly_through_pil():
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.float32) / 255)
    images = image_batch_to_pil(pixels)
    assert [im.size for im in images] == [(7, 5), (7, 5)] and images[0].mode == "RGB"
    assert torch.equal(pil_to_image_batch(images), pixels)


def test_grayscale_and_rgba_batches_become_rgb():
    gray = image_batch_to_pil(torch.full((1, 4, 4, 1), 0.5))[0]
    assert gray.getpixel((0, 0)) == (128, 128, 128)
    rgba = image_batch_to_pil(torch.ones(1, 4, 4, 4))[0]
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="IMAGE batch"):
        image_batch_to_pil(torch.ones(4, 4, 3))


def test_folder_fingerprint_sees_added_and_rewritten_photos(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    first = folder_fingerprint(str(tmp_path))
    assert folder_fingerprint(str(tmp_path)) == first
    Image.new("RGB", (8, 8), "red").save(tmp_path / "b.png")
    second = folder_fingerprint(str(tmp_path))
    assert second != first
    os.utime(tmp_path / "a.png", ns=(1, 1))  # rewritten in place: same name and size, new mtime
    assert folder_fingerprint(str(tmp_path)) != second


def test_trigger_phrase_comes_from_the_header(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(tiny_bundle("sd1"), path, {"modelspec.trigger_phrase": "a zwx dog"})
    assert read_trigger_phrase(str(path)) == "a zwx dog"
    save_checkpoint(tiny_bundle("sd1"), path, {})
    assert read_trigger_phrase(str(path)) == ""


def test_an_empty_class_noun_is_refused_by_name():
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="class_noun is empty"):
            require_class_noun(empty)
    assert require_class_noun("  teddy   bear ") == "teddy bear"


TRAIN_RENAMES = {"instance_dir": "instance_folder", "max_train_steps": "steps", "mixed_precision": "precision"}


def test_engine_messages_are_put_in_the_nodes_words():
    assert node_message("max_train_steps: 0 must be at least 1", TRAIN_RENAMES) == "steps: 0 must be at least 1"
    assert node_message("set --mixed-precision bf16, not mixed_precision_x", TRAIN_RENAMES) == \
        "set precision bf16, not mixed_precision_x"  # whole names only
    # A plain word is renamed only as the subject of a message: "output" also means the file.
    assert node_message("output: x exists; choose another output name", {"output:": "output_name:"}) == \
        "output_name: x exists; choose another output name"
    assert "command" not in node_message(PICK_ADVICE, {}) and "python -m" not in node_message(PICK_ADVICE, {})
    assert node_message(PICK_ADVICE, {}).endswith("with the Pick Rare Token node.")
    with pytest.raises(ConfigError) as raised:
        TrainConfig(base_model="m.safetensors", class_noun="dog", output="o.safetensors").validate()
    assert node_message(str(raised.value), {}) == "identifier is not set: pick one with the Pick Rare Token node"


def raise_in_node(error: Exception):
    with plain_errors(TRAIN_RENAMES):
        raise error


@pytest.mark.parametrize("error, plain", [
    (ConfigError("instance_dir is not set: give the folder"), ValueError),
    (ImageError("photos/99.jpg cannot be read as an image"), ValueError),
    (OutOfMemory("training", "The GPU ran out of memory in training"), MemoryError),
    (FloatingPointError("The loss became nan: lower learning_rate or set mixed_precision 'no'"), FloatingPointError),
])
def test_engine_errors_reach_comfyui_as_builtin_types_in_the_nodes_words(error, plain):
    with pytest.raises(Exception) as raised:
        raise_in_node(error)
    assert type(raised.value) is plain  # ComfyUI shows a builtin's plain name, the pack's by its module path
    assert raised.value.__cause__ is error
    assert "instance_dir" not in str(raised.value) and "mixed_precision" not in str(raised.value)
    assert str(raised.value) == node_message(str(error), TRAIN_RENAMES)


def test_signals_and_foreign_errors_pass_through_untouched():
    class Interrupted(Exception):  # stands for ComfyUI's InterruptProcessingException
        pass

    for error in (TrainingCancelled(3, "state"), Interrupted("stop"), torch.OutOfMemoryError("CUDA out of memory")):
        with pytest.raises(type(error)) as raised:
            raise_in_node(error)
        assert raised.value is error


def step(n: int, total: int = 100) -> StepInfo:
    return StepInfo(step=n, total=total, loss=0.25, instance_loss=0.2, prior_loss=0.05, lr=1e-4, elapsed_s=61.0,
                    eta_s=3725.0)


def test_the_step_log_writes_a_line_every_10_steps_or_30_seconds_and_the_last_step():
    now = [0.0]
    log = StepLog(every_steps=10, every_s=30.0, clock=lambda: now[0])
    logged = []
    for n in range(1, 101):
        now[0] += 0.5 if n < 60 else 20.0  # fast steps, then slow ones
        if log.line(step(n)):
            logged.append(n)
    # Every 10 steps while they are fast; every other step (40 s apart) once they take 20 s; and the last.
    assert logged == [1, 11, 21, 31, 41, 51, *range(61, 100, 2), 100]
    assert StepLog().line(step(1)) == ("Step 1/100: loss 0.2500 (instance 0.2000, prior 0.0500), learning "
                                                   "rate 0.0001, 1:01 elapsed, about 1:02:05 left")
    resumed = StepLog()
    assert resumed.line(step(57)) and not resumed.line(step(58))  # a resumed run logs its first step too


def test_a_train_nodes_run_log_keeps_its_last_run_compact_for_a_page_opened_later():
    log = comfy_io.RunLog(max_steps=8)
    step = {"instance_loss": 0.1, "prior_loss": 0.2, "lr": 1e-5, "elapsed_s": 1.0, "eta_s": 9.0}
    log.add("progress", {"step": 1, "total": 3, "loss": 0.9, **step})
    log.add("done", {"output": "dreambooth/old.safetensors", "steps": 3})
    log.add("status", {"text": "Training SD 1.x at 64 px"})
    for n in range(1, 41):  # a new run: step 1 again, another step count
        log.add("progress", {"step": n, "total": 60, "loss": float("nan") if n == 5 else 1 / n, **step})
    log.add("stopped", {"step": 40, "text": "Queue the same workflow again to continue from here."})
    steps = [e for e in log.events if e["type"] == "progress"]
    assert [e["type"] for e in log.events] == ["progress"] * len(steps) + ["stopped"]  # the old run is gone
    assert len(steps) <= 8 and steps[0]["step"] == 1 and steps[-1]["step"] == 40
    assert steps == sorted(steps, key=lambda e: e["step"])
    assert steps[0] == {"type": "progress", "step": 1, "total": 60, "loss": 1.0}  # slimmed: the chart's point
    assert steps[-1] == {"type": "progress", "step": 40, "total": 60, "loss": 1 / 40, **step}  # the status line's
    json.dumps(log.events, allow_nan=False)  # the page reads it as JSON

    nan = comfy_io.RunLog()
    nan.add("progress", {"step": 1, "total": 2, "loss": float("nan"), **step})
    assert nan.events[0]["loss"] is None  # a skipped point on the chart
    nan.add("progress", {"step": 2, "total": 2, "loss": 0.5, **step})
    nan.add("progress", {"step": 2, "total": 2, "loss": 0.4, **step})  # resumed from an earlier state: kept, the
    assert [e["step"] for e in nan.events] == [1, 2, 2]  # page drops the later points as it did live
