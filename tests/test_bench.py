"""bench/dreambooth_bench.py works: settings parse, FLOPs are counted, the table has its ratio columns, and one tiny run
end to end, ours only and (marked `reference`, see conftest.py) against the reference script."""
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from bench import dreambooth_bench as bench
from trainer.config import TrainConfig

# bench.main(["--threads", "1", ...]) sets this process's torch threads; the fixture (conftest.py) gives the count back
# when the module ends, so later modules (the reference comparison among them) run at the session's own.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_settings_combine_our_overrides_and_reference_flags():
    setting = bench.parse_setting("bf16+8bit+gc")
    assert setting.ours == {"mixed_precision": "bf16", "optimizer": "adamw8bit", "gradient_checkpointing": True}
    assert setting.reference == ("--mixed_precision", "bf16", "--use_8bit_adam", "--gradient_checkpointing")
    preset = bench.parse_setting("8GB+te")  # resolved by train() for the GPU at hand; the reference has no presets
    assert preset.ours == {**bench.BASE_OURS, "memory_preset": "8 GB", "train_text_encoder": True}
    assert preset.reference is None and "8GB" in bench.default_matrix(cuda=True)
    for name in bench.default_matrix(cuda=True) + bench.default_matrix(cuda=False):
        assert bench.parse_setting(name).name == name  # every default setting parses
    with pytest.raises(ValueError, match="unknown part"):
        bench.parse_setting("bf16+warp_drive")
    with pytest.raises(ValueError, match="both set mixed_precision"):
        bench.parse_setting("fp16+bf16")


def test_every_config_boolean_can_be_benchmarked():
    atoms = bench.all_atoms()
    covered = {key for atom in atoms.values() for key in atom.ours} | set(bench.FIXED_BOOLEANS)
    booleans = {f.name for f in dataclasses.fields(TrainConfig) if f.type in (bool, "bool")}
    assert booleans <= covered
    for name in bench.boolean_atoms():
        assert bench.parse_setting(f"bf16+{name}").ours[name] is True
        assert bench.parse_setting(name).reference is None or name in bench.REFERENCE_FLAGS


def test_flops_of_a_step_are_positive_and_grow_with_what_is_trained():
    unet_only = bench.training_step_flops("sd1", True, 32, False)
    with_text = bench.training_step_flops("sd1", True, 32, True)
    assert 0 < unet_only < with_text
    assert bench.training_step_flops("sd1", True, 64, False) > 3 * unet_only  # 4x the latent pixels


def test_step_times_leave_out_the_warmup():
    m = bench.Measurement(step_end_s=[1.0, 3.0, 3.5, 4.0, 4.6])
    assert m.step_times(warmup=2) == pytest.approx([0.5, 0.5, 0.6])
    assert m.steps_per_second(warmup=2) == pytest.approx(2.0)


def _plan(tmp_path, reference: bool) -> bench.Plan:
    return bench.Plan(families=["sd1"], settings=[bench.parse_setting("fp32")], small=True, steps=3, warmup=1,
                      resolution=32, work_dir=tmp_path, reference_script="ref.py" if reference else None,
                      reference_python="python", reference_extra_args=[], threads=1, timeout=60,
                      peak_tflops=100.0, peak_source="test")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_has_ratio_columns(tmp_path):
    plan = _plan(tmp_path, reference=True)
    ours = bench.Measurement([0.0, 1.0, 1.5, 2.0], peak_allocated=3 * bench.GIB, peak_reserved=4 * bench.GIB)
    ref = bench.Measurement([0.0, 1.0, 2.0, 3.0], peak_allocated=6 * bench.GIB, peak_reserved=8 * bench.GIB)
    row = bench.Row("sd1", plan.settings[0], flops=10**12, ours=ours, reference=ref)
    header, _, line = bench.markdown_table([row], plan).splitlines()
    cells = dict(zip(_cells(header), _cells(line)))
    assert cells["alloc ours/ref"] == "0.5" and cells["reserved ours/ref"] == "0.5"
    assert cells["steps/s ours"] == "2" and cells["steps/s ref"] == "1" and cells["speed ours/ref"] == "2"
    assert cells["MFU ours"] == "0.02"  # 1 TFLOP x 2 steps/s / 100 TFLOPS
    no_reference = bench.markdown_table([row], _plan(tmp_path, reference=False)).splitlines()[0]
    assert "ours/ref" not in no_reference and "steps/s ours" in no_reference


def _tiny_run(tmp_path, capsys, reference_args: list[str]) -> str:
    args = ["--small", "--family", "sd1", "--settings", "fp32", "--steps", "2", "--warmup", "1", "--resolution",
            "32", "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "r.json")]
    assert bench.main(args + reference_args) == 0  # nonzero when a run failed
    table = capsys.readouterr().out
    assert "| SD1.5 (small) | fp32 |" in table
    return table


def test_one_tiny_run_end_to_end(tmp_path, capsys):
    table = _tiny_run(tmp_path, capsys, ["--no-reference"])
    assert "speed ours/ref" not in table and "| steps/s ours |" in table
    if not torch.cuda.is_available():
        assert "only speeds relative to each other are meaningful" in table


@pytest.mark.reference  # a Python with torchvision and accelerate: this one (CI's reference step)
@pytest.mark.slow
def test_one_tiny_run_against_the_reference(tmp_path, capsys):
    table = _tiny_run(tmp_path, capsys, ["--reference-script", os.environ["DREAMBOOTH_REFERENCE_SCRIPT"],
                                         "--reference-python", sys.executable])
    assert "speed ours/ref" in table and "ours vs diffusers' train_dreambooth.py" in table
    if not torch.cuda.is_available():
        assert "only the speed ratios are meaningful" in table


@pytest.mark.slow
def test_class_images_and_the_capped_whole_run_report_every_phase(tmp_path, capsys):
    args = ["--small", "--settings", "--class-images", "8", "--whole-run", "7.6", "--no-reference", "--steps", "2",
            "--warmup", "1", "--resolution", "32", "--threads", "1", "--out", str(tmp_path / "r.json")]
    assert bench.main(args) == 0
    table = capsys.readouterr().out
    assert "## Class images: ours vs diffusers' StableDiffusionPipeline" in table
    ours, reference = json.loads((tmp_path / "r.json").read_text())["class_images"][0]["images_per_second"].values()
    assert ours > 0 and reference > 0
    rows = [line for line in table.splitlines() if line.startswith("| SD1.5 | 7.6 | 8GB |")]
    phases = [(cells[3], cells[4]) for cells in (_cells(row) for row in rows)]
    assert phases == [("pick-token", "token probing"), ("train", "class images"), ("train", "photo encoding"),
                      ("train", "training"), ("train", "previews"), ("train", "saving"), ("sample", "sampling")]


def test_reference_python_may_be_a_command_name(tmp_path):
    script = tmp_path / "train_dreambooth.py"
    script.write_text("")
    args = bench.parse_args(["--reference-script", str(script), "--reference-python", "python3"])
    assert Path(args.reference_python).is_file() and Path(args.reference_python).name.startswith("python")
    with pytest.raises(SystemExit):
        bench.parse_args(["--reference-script", str(script), "--reference-python", "no-such-python-here"])


# --- SDXL: against diffusers' train_text_to_image_sdxl.py ------------------------------------------------------------


def test_sdxl_settings_caps_and_the_references_command_line(tmp_path):
    best = bench.parse_setting("ref_best")
    assert best.ours == {"mixed_precision": "bf16", "optimizer": "adamw8bit", "gradient_checkpointing": True}
    assert best.reference == ("--mixed_precision", "bf16", "--use_8bit_adam", "--gradient_checkpointing")
    for name in bench.default_matrix(cuda=True, family="sdxl") + bench.default_matrix(cuda=False, family="sdxl"):
        assert bench.parse_setting(name).name == name
    caps = {name: bench.preset_cap("sdxl", bench.parse_setting(name)) for name in ("12GB", "12GB+te", "24GB", "fp32")}
    assert caps == {"12GB": 11.6, "12GB+te": 15.6, "24GB": 23.6, "fp32": None}
    assert bench.preset_cap("sd1", bench.parse_setting("8GB+te")) == 7.6
    args = bench.sdxl_reference_args("model", "data", "out", steps=6, learning_rate=2e-6, resolution=1024)
    assert args[args.index("--train_batch_size") + 1] == "2" and "--center_crop" in args
    assert bench.parse_args(["--family", "sdxl", "--no-reference"]).whole_run is None
    plan = bench.make_plan(bench.parse_args(["--family", "sdxl", "--no-reference", "--whole-run"]), tmp_path)
    assert plan.resolution == 1024 and plan.caps == (11.6, 15.6)


def test_sdxl_flops_count_both_text_encoders_when_trained():
    frozen = bench.training_step_flops("sdxl", True, 64, False)
    trained = bench.training_step_flops("sdxl", True, 64, True)
    assert trained > frozen > 0


def test_the_datasets_stand_in_feeds_the_sdxl_script_as_datasets_would(tmp_path, monkeypatch):
    """What train_text_to_image_sdxl.py does with `datasets`, step by step, on the stand-in."""
    from PIL import Image

    from bench.reference_script import write_caption_folder
    monkeypatch.syspath_prepend(str(Path(bench.__file__).parent / "stand_ins"))
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    import datasets
    from datasets import concatenate_datasets, load_dataset
    from datasets.fingerprint import Hasher
    assert datasets.__version__ == "stand-in"
    datasets.utils.logging.set_verbosity_warning()
    photos = []
    for i, size in enumerate((40, 48, 56)):
        photos.append(tmp_path / f"{i}.png")
        Image.new("RGB", (size, 32)).save(photos[-1])
    folder = write_caption_folder(tmp_path / "data", {"a zwx dog": photos[:2], "a dog": photos[2:]})
    dataset = load_dataset("imagefolder", data_files={"train": os.path.join(folder, "**")}, cache_dir=None)
    assert dataset["train"].column_names == ["image", "text"] and len(dataset["train"]) == 3

    def preprocess(examples):  # as the script's preprocess_train: adds columns to the batch it is given
        examples["original_sizes"] = [(im.height, im.width) for im in examples["image"]]
        examples["pixel_values"] = [torch.full((3, 4, 4), float(im.width)) for im in examples["image"]]
        return examples

    train = dataset["train"].with_transform(preprocess)
    seen = []

    def embed(batch):
        seen.append(len(batch["text"]))
        return {"prompt_embeds": [torch.tensor([len(text)]) for text in batch["text"]]}

    def encode(batch):
        pixels = torch.stack(list(batch.pop("pixel_values")))
        return {"model_input": pixels[:, :1] * 2}

    with_embeddings = train.map(embed, batched=True, new_fingerprint=Hasher.hash("a"))
    with_latents = train.map(encode, batched=True, batch_size=2, new_fingerprint=Hasher.hash("b"))
    assert seen == [3]  # one batch of all rows (datasets' default batch_size 1000)
    assert with_latents.column_names == ["image", "text", "model_input"]  # what the function returned is added
    precomputed = concatenate_datasets([with_embeddings, with_latents.remove_columns(["image", "text"])], axis=1)
    precomputed = precomputed.with_transform(preprocess)
    row = precomputed[2]
    assert row["text"] == "a dog" and row["original_sizes"] == (32, 56)
    assert row["prompt_embeds"].tolist() == [5] and row["model_input"][0, 0, 0].item() == 112.0
    loader = torch.utils.data.DataLoader(precomputed, batch_size=2, collate_fn=lambda rows: rows)
    assert [len(batch) for batch in loader] == [2, 1]


def test_the_comfyui_benchmark_gives_each_node_the_phases_it_logged_and_finds_what_is_over_budget():
    from bench import comfyui_bench
    # A capped GPU run's server log, as ComfyUI prints it: the pack's phase lines, then the probe's line for the node
    # that ran them (bench/comfyui_probe), and ComfyUI's own lines between.
    log = "\n".join([
        "got prompt",
        "[DreamBooth] Phase token probing: 3.9 s, peak 2.02 GiB allocated / 2.31 GiB reserved",
        "[bench] node 2 DBStudioPickRareToken: 7.8 s, peak 2.05 GiB allocated / 2.33 GiB reserved",
        "[DreamBooth] Phase class images: 48.4 s, peak 2.50 GiB allocated / 2.85 GiB reserved",
        "[bench] node 3 DBStudioGenerateClassPriors: 49.0 s, peak 2.51 GiB allocated / 2.86 GiB reserved",
        "[DreamBooth] Phase photo encoding: 0.9 s, peak 0.47 GiB allocated / 0.62 GiB reserved",
        "[DreamBooth] Phase training: 82.6 s, peak 4.76 GiB allocated / 7.33 GiB reserved",
        "[bench] node 4 DBStudioTrain: 84.8 s, peak 4.80 GiB allocated / 7.40 GiB reserved",
        "Requested to load BaseModel",
        "[bench] node 9 KSampler: 1.9 s, peak 2.10 GiB allocated / 2.20 GiB reserved",
        "Prompt executed in 150 seconds",
    ])
    nodes = comfyui_bench.read_log(log, {"2": "DBStudioPickRareToken", "3": "DBStudioGenerateClassPriors",
                                         "4": "DBStudioTrain", "9": "KSampler"})
    assert [node["node"] for node in nodes] == ["DBStudioPickRareToken", "DBStudioGenerateClassPriors",
                                                "DBStudioTrain", "KSampler"]
    assert [[phase["phase"] for phase in node["phases"]] for node in nodes] == [
        ["token probing"], ["class images"], ["photo encoding", "training"], []]
    assert nodes[2]["phases"][1]["reserved_gib"] == 7.33 and nodes[3]["allocated_gib"] == 2.10
    run = {"cap_gib": 7.6, "budget_gib": bench.card_budget(7.6), "nodes": nodes}
    assert comfyui_bench.over_budget([run]) == ["DBStudioTrain at 7.6 GiB", "DBStudioTrain/training at 7.6 GiB"]
    assert comfyui_bench.over_budget([{**run, "budget_gib": bench.card_budget(11.6)}]) == []
    assert [comfyui_bench.node_preset(cap) for cap in (5.8, 7.6, 11.6)] == ["6 GB", "8 GB", "12 GB"]
    # on a CPU nothing is measured, and nothing is over
    cpu = comfyui_bench.read_log("[DreamBooth] Phase training: 82.6 s\n[bench] node 4 DBStudioTrain: 84.8 s", {})
    assert cpu == [{"node": "DBStudioTrain", "id": "4", "seconds": 84.8, "allocated_gib": None, "reserved_gib": None,
                    "phases": [{"phase": "training", "seconds": 82.6, "allocated_gib": None, "reserved_gib": None}]}]
    assert comfyui_bench.over_budget([{**run, "nodes": cpu}]) == []
