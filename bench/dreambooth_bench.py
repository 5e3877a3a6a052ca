"""Benchmark our training loop (trainer.loop.train) against diffusers' examples/dreambooth/train_dreambooth.py (SD 1.x /
2.x) or, for SDXL, examples/text_to_image/train_text_to_image_sdxl.py (diffusers' full fine-tune of SDXL; it has no
DreamBooth one).

For each model family and each setting of the matrix, both implementations train the same randomly initialised model
for N steps (batch 1 + 1 class image, prior preservation), each in a fresh subprocess measured from inside
(bench/probe.py). The result is a markdown table of peak GPU memory, steps per second and model FLOPs utilisation,
with our/reference ratios. See bench/README.md;  python bench/dreambooth_bench.py --help
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.models import model_configs, random_bundle  # noqa: E402
from bench.reference_script import (SDXL_REFERENCE_BEST, reference_args, save_pipeline_folder,  # noqa: E402
                                    save_sdxl_pipeline_folder, sdxl_reference_args, write_caption_folder)
from trainer.config import TrainConfig  # noqa: E402
from trainer.presets import PRESETS, short_name  # noqa: E402

PROBE = Path(__file__).resolve().parent / "probe.py"
CAPPED = Path(__file__).resolve().parent / "capped.py"
DEFAULT_REFERENCE_SCRIPT = os.environ.get("DREAMBOOTH_REFERENCE_SCRIPT", "")
DEFAULT_REFERENCE_PYTHON = os.environ.get("DREAMBOOTH_REFERENCE_PYTHON", "python3")

MODEL_NAMES = {"sd1": "SD1.5", "sd2": "SD2.1", "sdxl": "SDXL"}
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}
NUM_IMAGES = 3  # instance photos and class images each; every step uses one of each
CLASS_IMAGE_BATCH = 4  # trainer.priors' default; the first batch is the class-image timing's warm-up
LEARNING_RATE = 2e-6
GIB = 2 ** 30

# --------------------------------------------------------------------------------------------------------------------
# Settings. A setting is a "+"-joined list of atoms, e.g. "bf16+8bit+gc". Each atom is TrainConfig overrides for us
# and the reference script's flags for the same thing (None: the reference has no equivalent; it is not run).
# To extend the matrix: add an atom here, or a name to DEFAULT_MATRIX.
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Atom:
    ours: dict
    reference: tuple[str, ...] | None


ATOMS = {
    "fp32": Atom({"mixed_precision": "no"}, ("--mixed_precision", "no")),
    "fp16": Atom({"mixed_precision": "fp16"}, ("--mixed_precision", "fp16")),
    "bf16": Atom({"mixed_precision": "bf16"}, ("--mixed_precision", "bf16")),
    "adamw": Atom({"optimizer": "adamw"}, ()),
    "8bit": Atom({"optimizer": "adamw8bit"}, ("--use_8bit_adam",)),
    "adafactor": Atom({"optimizer": "adafactor"}, None),  # (neither reference script offers it)
    "gc": Atom({"gradient_checkpointing": True}, ("--gradient_checkpointing",)),
    # SDXL's reference (train_text_to_image_sdxl.py) at its best setting: bf16, 8-bit AdamW, checkpointing
    "ref_best": Atom({"mixed_precision": "bf16", "optimizer": "adamw8bit", "gradient_checkpointing": True},
                     SDXL_REFERENCE_BEST),
    "te": Atom({"train_text_encoder": True}, ("--train_text_encoder",)),
    # The memory presets, resolved for the GPU at hand (trainer/presets.py); the reference has none.
    **{short_name(name): Atom({"memory_preset": name}, None) for name in PRESETS},
}
# What every setting starts from (the reference's base is bench.reference_script.reference_args: fp32, AdamW).
BASE_OURS = {"mixed_precision": "no", "optimizer": "adamw"}
# TrainConfig booleans that are no setting to compare: prior preservation is always on, resume is off.
FIXED_BOOLEANS = {"with_prior_preservation": True, "resume": False}
# The reference's flag for a TrainConfig boolean added later; one without an entry is benchmarked for us only.
REFERENCE_FLAGS = {}

# What the targets compare, on one GPU in a few minutes: the presets, and the two reference settings they are
# held against (bf16+8bit+gc for the small presets and ours vs the reference; bf16 for the 24 GB preset).
DEFAULT_MATRIX = ("bf16+8bit+gc", "8GB", "8GB+te", "12GB", "24GB", "bf16")
DEFAULT_CPU_MATRIX = ("fp32", "bf16", "fp32+gc", "fp32+te")  # no 8-bit AdamW or fp16 autocast on a CPU
# SDXL at 1024 px: the presets of 12 GB (UNet; both text encoders, for 16 GB cards) and 24 GB, against the reference
# at its best setting (ours at the same setting beside it).
DEFAULT_SDXL_MATRIX = ("ref_best", "12GB", "12GB+te", "24GB")
# --cap-presets: a preset's run is capped at what its card leaves (torch.cuda.set_per_process_memory_fraction).
# For SDXL, "12GB+te" is the 16 GB card's run: the issue holds the text encoders' training to a 16 GB card.
PRESET_CAPS = {"6GB": 5.8, "8GB": 7.6, "12GB": 11.6, "24GB": 23.6}
SDXL_TE_CAP = 15.6
CARD_BUDGETS = {6: 5.3, 8: 7.0, 12: 10.5}  # GiB reserved a 6 / 8 / 12 GB card leaves for one process (issue 10)
SDXL_CARD_BUDGETS = {12: 11.0, 16: 15.0}  # issue 12's budgets for SDXL on 12 and 16 GB cards


def preset_for_cap(cap: float) -> str:
    """The memory preset for a card that reports `cap` GiB (as typed on a command line)."""
    return "6GB" if cap < 7 else "8GB" if cap < 11 else "12GB" if cap < 20 else "24GB"


def card_budget(cap: float, budgets: dict[int, float] = CARD_BUDGETS) -> float:
    """The reserved GiB a card that reports `cap` GiB leaves for one process (the cap itself for other sizes)."""
    return next((budget for card, budget in budgets.items() if abs(cap - card) < 1), cap)


@dataclass(frozen=True)
class Setting:
    name: str
    ours: dict
    reference: tuple[str, ...] | None  # None: the reference cannot express this setting


def boolean_atoms() -> dict[str, Atom]:
    """An atom flipping each TrainConfig boolean that no atom in ATOMS covers (new options show up by themselves)."""
    covered = {key for atom in ATOMS.values() for key in atom.ours} | set(FIXED_BOOLEANS)
    atoms = {}
    for f in dataclasses.fields(TrainConfig):
        if f.type in (bool, "bool") and f.name not in covered:
            flipped = not f.default
            flag = REFERENCE_FLAGS.get(f.name)
            atoms[f.name if flipped else f"no_{f.name}"] = Atom({f.name: flipped}, flag)
    return atoms


def all_atoms() -> dict[str, Atom]:
    return {**ATOMS, **boolean_atoms()}


def parse_setting(name: str, atoms: dict[str, Atom] | None = None) -> Setting:
    atoms = atoms or all_atoms()
    ours, reference, set_by = dict(BASE_OURS), [], {}
    for part in name.split("+"):
        if part not in atoms:
            raise ValueError(f"setting {name!r}: unknown part {part!r}; known parts: {', '.join(atoms)}")
        atom = atoms[part]
        for key in atom.ours:
            if key in set_by:
                raise ValueError(f"setting {name!r}: {set_by[key]!r} and {part!r} both set {key}")
            set_by[key] = part
        ours.update(atom.ours)
        reference = None if reference is None or atom.reference is None else reference + list(atom.reference)
    return Setting(name, ours, None if reference is None else tuple(reference))


def default_matrix(cuda: bool, family: str = "sd1") -> list[str]:
    """The settings run when none are named; every other part (the TrainConfig booleans too) can be named."""
    if family == "sdxl":
        return list(DEFAULT_SDXL_MATRIX) if cuda else ["fp32", "fp32+gc", "adafactor+gc+fused_backward"]
    return list(DEFAULT_MATRIX if cuda else DEFAULT_CPU_MATRIX)


def preset_cap(family: str, setting: Setting) -> float | None:
    """The GiB a preset's run is capped at with --cap-presets (None: not a preset)."""
    parts = setting.name.split("+")
    cap = next((PRESET_CAPS[part] for part in parts if part in PRESET_CAPS), None)
    if cap is not None and family == "sdxl" and "te" in parts and cap < SDXL_TE_CAP:
        return SDXL_TE_CAP
    return cap


# --------------------------------------------------------------------------------------------------------------------
# Models (random weights: the values change neither memory nor speed) and the FLOPs of one training step.
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def training_step_flops(family: str, small: bool, resolution: int, train_text_encoder: bool) -> int:
    """FLOPs of one training step's forward + backward: the UNet on the instance and class latents and, when it is
    trained, the text encoder on their two prompts. Counted with FlopCounterMode on the meta device (shapes only,
    nothing is computed) and without gradient checkpointing: model FLOPs, not the recomputation checkpointing adds."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    configs, batch = model_configs(family, small), 2
    latent_side = resolution // 2 ** (len(configs.vae["block_out_channels"]) - 1)
    text_configs = [configs.text] + ([configs.text_2] if family == "sdxl" else [])
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs.unet)
        encoders = [CLIPTextModel(CLIPTextConfig(**c)).requires_grad_(train_text_encoder) for c in text_configs]
        latents = torch.randn(batch, unet.config.in_channels, latent_side, latent_side)
        timesteps = torch.zeros(batch, dtype=torch.long)
        ids = torch.zeros(batch, configs.text["max_position_embeddings"], dtype=torch.long)
        cached_states = torch.randn(batch, ids.shape[1], sum(c["hidden_size"] for c in text_configs))
        extra = {}
        if family == "sdxl":  # the pooled embedding and the six time ids (the pooled one's projection aside)
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}}
    unet.set_attn_processor(AttnProcessor2_0())  # what train() uses
    with FlopCounterMode(display=False) as counter:
        states = (torch.cat([e(ids, output_hidden_states=family == "sdxl")[0] for e in encoders], -1)
                  if train_text_encoder else cached_states)
        unet(latents, timesteps, states, **extra).sample.float().square().mean().backward()
    return counter.get_total_flops()


# Dense (no sparsity) bf16/fp16 tensor peak with fp32 accumulation, TFLOPS, from the vendors' datasheets; matched in
# order against torch.cuda.get_device_name(), so more specific names come first. --peak-tflops overrides.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A40", 149.7),
    ("RTX 6000 Ada", 364.0), ("A6000", 154.8), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("V100", 125.0),
    ("T4", 65.0), ("MI300X", 1307.0),
)


def peak_tflops(override: float | None) -> tuple[float | None, str]:
    """(peak TFLOPS, where the figure comes from)."""
    if override:
        return override, "--peak-tflops"
    if not torch.cuda.is_available():
        return None, "no CUDA device; give --peak-tflops for an MFU"
    name = torch.cuda.get_device_name()
    for pattern, tflops in PEAK_TFLOPS:
        if pattern in name:
            return tflops, f"datasheet figure for {name}"
    return None, f"{name} is not in the table; give --peak-tflops"


# --------------------------------------------------------------------------------------------------------------------
# Runs: each in its own subprocess (bench/probe.py), measured from inside it.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    step_end_s: list[float] = field(default_factory=list)
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    device: str = ""
    torch: str = ""
    error: str = ""

    def step_times(self, warmup: int) -> list[float]:
        """Durations of the steps after the first `warmup` (end of one step to the end of the next)."""
        ends = self.step_end_s[max(warmup, 1) - 1:]
        return [b - a for a, b in zip(ends, ends[1:])]

    def steps_per_second(self, warmup: int) -> float | None:
        times = self.step_times(warmup)
        return 1.0 / statistics.median(times) if times else None

    def rate(self, warmup: int) -> float | None:
        """Items per second over everything after the first `warmup` items (for images, which finish in batches)."""
        ends = self.step_end_s[max(warmup, 1) - 1:]
        return (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else None

    @classmethod
    def read(cls, path: Path) -> "Measurement":
        data = json.loads(path.read_text())
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass
class Plan:
    families: list[str]
    settings: list[Setting]
    small: bool
    steps: int
    warmup: int
    resolution: int
    work_dir: Path
    reference_script: str | None  # None: --no-reference
    reference_python: str
    reference_extra_args: list[str]
    threads: int | None
    timeout: float
    peak_tflops: float | None
    peak_source: str
    class_images: int = 0  # > 0: also time class-image generation, ours vs StableDiffusionPipeline
    caps: tuple[float, ...] = ()  # GiB: also run the command line's whole run under each memory cap
    cap_presets: bool = False  # run each preset of the matrix capped at its card's memory (PRESET_CAPS)


@dataclass
class Images:
    instance: Path
    classes: Path


@dataclass
class Row:
    family: str
    setting: Setting
    flops: int
    ours: Measurement
    reference: Measurement | None  # None: not run (see reference_note)
    reference_note: str = ""


@dataclass
class Models:
    """One family's random model, made once: a single file for us (loaded by the real loader in every run) and a
    diffusers folder for the reference."""
    single_file: Path
    diffusers_folder: Path | None


def make_images(folder: Path, resolution: int) -> Images:
    """NUM_IMAGES noise photos and class images (the trainer refuses photos under 64 px)."""
    rng, side = np.random.default_rng(0), max(resolution, 64)
    images = Images(folder / "instance", folder / "class")
    for sub in (images.instance, images.classes):
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(NUM_IMAGES):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(sub / f"{i:02d}.png")
    return images


def make_models(plan: Plan, family: str) -> Models:
    from trainer.checkpoint import save_checkpoint
    folder = plan.work_dir / family
    folder.mkdir(parents=True, exist_ok=True)
    progress(f"[{family}] a random {MODEL_NAMES[family]}: made once, saved for every run")
    bundle = random_bundle(family, plan.small)
    single_file = folder / f"random-{family}.safetensors"
    save_checkpoint(bundle, single_file, {}, dtype=torch.float16)
    diffusers_folder = None
    if plan.reference_script or plan.class_images:
        save = save_sdxl_pipeline_folder if family == "sdxl" else save_pipeline_folder
        diffusers_folder = save(bundle, folder / "diffusers")
    return Models(single_file, diffusers_folder)


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               DIFFUSERS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    if threads:
        env.update(BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    return env


def run_probe(python: str, kind: str, args: list[str], run_dir: Path, plan: Plan) -> Measurement:
    """Run bench/probe.py KIND RESULT ARGS in a fresh process; its measurement, or one with `error` set."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result, log = run_dir / "result.json", run_dir / "log.txt"
    command = [python, str(PROBE), kind, str(result), *args]
    (run_dir / "command.txt").write_text(shlex.join(command) + "\n")
    try:
        proc = subprocess.run(command, cwd=run_dir, env=child_env(plan.threads), capture_output=True, text=True,
                              timeout=plan.timeout)
    except subprocess.TimeoutExpired:
        return Measurement(error=f"timed out after {plan.timeout:.0f} s")
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.is_file():
        return Measurement(error=f"{last_error_line(proc.stdout + proc.stderr)} (exit {proc.returncode}; {log})")
    return Measurement.read(result)


def last_error_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines or ["no output"])[-1][:300]


def run_ours(plan: Plan, setting: Setting, images: Images, models: Models, run_dir: Path,
             cap_gib: float | None = None) -> Measurement:
    config = dict(base_model=str(models.single_file), instance_dir=str(images.instance),
                  class_dir=str(images.classes), identifier="zwx", class_noun="dog",
                  output=str(run_dir / "out" / "zwx-dog.safetensors"), num_class_images=NUM_IMAGES,
                  resolution=plan.resolution, batch_size=1, max_train_steps=plan.steps, learning_rate=LEARNING_RATE,
                  seed=0, **FIXED_BOOLEANS)
    config.update(setting.ours)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / "spec.json"
    spec.write_text(json.dumps({"config": config, "cap_gib": cap_gib}, indent=1))
    return run_probe(sys.executable, "ours", [str(spec)], run_dir, plan)


def run_reference(plan: Plan, setting: Setting, images: Images, model_dir: Path, run_dir: Path,
                  family: str = "sd1") -> Measurement:
    if family == "sdxl":  # the same images and captions, two a step as ours (a photo and a class image)
        data = write_caption_folder(run_dir / "data", {"a zwx dog": sorted(images.instance.iterdir()),
                                                       "a dog": sorted(images.classes.iterdir())})
        args = sdxl_reference_args(model_dir, data, run_dir / "out", steps=plan.steps, learning_rate=LEARNING_RATE,
                                   resolution=plan.resolution, batch_size=2)
    else:
        args = reference_args(model_dir, images.instance, images.classes, run_dir / "out", steps=plan.steps,
                              learning_rate=LEARNING_RATE, train_text_encoder=False, resolution=plan.resolution,
                              num_class_images=NUM_IMAGES)
    args += [*setting.reference, *plan.reference_extra_args]  # argparse: a repeated option's last value wins
    return run_probe(plan.reference_python, "reference", [plan.reference_script, "--", *args], run_dir, plan)


def run_matrix(plan: Plan) -> tuple[list[Row], list[Row], list[dict]]:
    """The training matrix, then (when asked) class-image generation and the capped whole runs, per family."""
    images = make_images(plan.work_dir / "images", plan.resolution)
    rows, class_rows, whole_runs = [], [], []
    for family in plan.families:
        models = make_models(plan, family)
        for setting in plan.settings:
            rows.append(run_setting(plan, family, setting, images, models))
        if plan.class_images:
            class_rows.append(run_class_images(plan, family, models))
        for cap in plan.caps:
            whole_runs.append(run_whole(plan, family, cap, images, models))
        shutil.rmtree(plan.work_dir / family, ignore_errors=True)  # gigabytes at full size
    return rows, class_rows, whole_runs


def run_setting(plan: Plan, family: str, setting: Setting, images: Images, models: Models) -> Row:
    run_dir = plan.work_dir / "runs" / family / setting.name
    flops = training_step_flops(family, plan.small, plan.resolution, setting.ours.get("train_text_encoder", False))
    cap = preset_cap(family, setting) if plan.cap_presets else None
    progress(f"[{family} {setting.name}] ours" + (f", capped at {cap:g} GiB" if cap else ""))
    ours = run_ours(plan, setting, images, models, run_dir / "ours", cap)
    report_progress(ours, plan)
    reference, note = None, ""
    if not plan.reference_script:
        note = "not run (--no-reference)"
    elif setting.reference is None:
        note = "the reference script has no flag for this setting"
    elif family == "sdxl" and setting.ours.get("train_text_encoder"):
        note = "train_text_to_image_sdxl.py trains the UNet only"
    else:
        progress(f"[{family} {setting.name}] reference")
        reference = run_reference(plan, setting, images, models.diffusers_folder, run_dir / "reference", family)
        report_progress(reference, plan)
    return Row(family, setting, flops, ours, reference, note)


def run_class_images(plan: Plan, family: str, models: Models) -> Row:
    """Images per second of class-image generation (30 steps, euler_a, guidance 7.5, batch 4, half precision where
    the GPU has it): ours (trainer.priors, writing PNGs) against diffusers' StableDiffusionPipeline on the same
    model and settings (images kept in memory). The first batch of each is warm-up."""
    run_dir = plan.work_dir / "runs" / family / "class-images"
    spec = {"count": plan.class_images, "size": plan.resolution, "steps": 30, "batch_size": CLASS_IMAGE_BATCH}
    sides = {}
    for side, model in (("ours", models.single_file), ("reference", models.diffusers_folder)):
        progress(f"[{family} class images] {side}")
        (run_dir / side).mkdir(parents=True, exist_ok=True)
        spec_path = run_dir / side / "spec.json"
        spec_path.write_text(json.dumps({**spec, "model": str(model)}))
        sides[side] = run_probe(sys.executable, f"{side}-class-images", [str(spec_path)], run_dir / side, plan)
        report_progress(sides[side], plan, unit="images/s")
    setting = Setting(f"class images ({plan.class_images}, batch {CLASS_IMAGE_BATCH})", {}, ())
    return Row(family, setting, 0, sides["ours"], sides["reference"])


WHOLE_RUN_PHASE = re.compile(r"Phase ([\w ]+): ([\d.]+) s(?:, peak ([\d.]+) GiB allocated / ([\d.]+) GiB reserved)?")


def run_whole(plan: Plan, family: str, cap: float, images: Images, models: Models) -> dict:
    """The command line as a user runs it (pick-token, train with class images generated, the text encoder trained
    and a preview, sample), each command in a process whose GPU memory is capped at `cap` GiB, with the memory
    preset for a card of that size; each phase's peak as the engine logs it."""
    preset = preset_for_cap(cap)
    # SDXL: the text encoders are trained on the 16 GB card's run (the budget for them), not on 12 GB's
    text_encoder = ["--train-text-encoder"] if family != "sdxl" or cap >= SDXL_TE_CAP - 0.5 else []
    run_dir = plan.work_dir / "runs" / family / f"whole-{cap:g}GiB"
    out = run_dir / "out" / "zwx-dog.safetensors"
    model = str(models.single_file)
    commands = {
        "pick-token": ["pick-token", "--model", model, "--class-noun", "dog", "--count", "3"],
        "train": ["train", "--model", model, "--images", str(images.instance), "--identifier", "zwx",
                  "--class-noun", "dog", "--output", str(out), "--memory-preset", preset, *text_encoder,
                  "--num-class-images", "8", "--prior-cache-dir", str(run_dir / "priors"), "--max-train-steps",
                  str(plan.steps), "--resolution", str(plan.resolution), "--sample-prompts", "a zwx dog on the beach"],
        "sample": ["sample", "--model", str(out), "--prompt", "a zwx dog on the beach", "--count", "2", "--size",
                   str(plan.resolution), "--out", str(run_dir / "samples")],
    }
    result = {"family": family, "cap_gib": cap, "preset": preset, "text_encoder": bool(text_encoder), "phases": [],
              "errors": []}
    for name, args in commands.items():
        progress(f"[{family} whole run, capped at {cap:g} GiB] {name}")
        command = [sys.executable, str(CAPPED), str(cap), "--", *args]
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run(command, cwd=REPO_ROOT, env=child_env(plan.threads), capture_output=True,
                                  text=True, timeout=plan.timeout)
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired:
            output, code = "", f"timed out after {plan.timeout:.0f} s"
        (run_dir / f"{name}.log").write_text(output)
        for match in WHOLE_RUN_PHASE.finditer(output):
            phase, seconds, allocated, reserved = match.groups()
            result["phases"].append({"command": name, "phase": phase, "seconds": float(seconds),
                                     "allocated_gib": float(allocated) if allocated else None,
                                     "reserved_gib": float(reserved) if reserved else None})
            progress(f"    {match.group(0)}")
        if code != 0:
            result["errors"].append(f"{name}: {last_error_line(output)} (exit {code}; {run_dir / f'{name}.log'})")
            progress(f"    failed: {result['errors'][-1]}")
    return result


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report_progress(m: Measurement, plan: Plan, unit: str = "steps/s") -> None:
    """One line as soon as a run ends: a run cut short later still leaves its figures on the screen."""
    if m.error:
        progress(f"    failed: {m.error}")
        return
    speed = m.rate(CLASS_IMAGE_BATCH) if unit == "images/s" else m.steps_per_second(plan.warmup)
    memory = ("" if m.peak_allocated is None else
              f", peak {m.peak_allocated / GIB:.2f} GiB allocated / {m.peak_reserved / GIB:.2f} GiB reserved")
    progress(f"    {speed:.3g} {unit}{memory}" if speed else f"    nothing timed{memory}")


# --------------------------------------------------------------------------------------------------------------------
# Report: a markdown table (columns declared once below) and a JSON file.
# --------------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _gib(value: int | None) -> float | None:
    return None if value is None else value / GIB


def _ratio_cell(row: Row, ours: float | None, reference: float | None) -> str:
    if row.reference is None:
        return "—"
    return _fmt(None if ours is None or not reference else ours / reference)


def _mfu(row: Row, m: Measurement | None, plan: Plan) -> float | None:
    speed = speed_of(m, plan)
    return None if speed is None or not plan.peak_tflops else row.flops * speed / (plan.peak_tflops * 1e12)


def speed_of(m: Measurement | None, plan: Plan) -> float | None:
    return None if m is None or m.error else m.steps_per_second(plan.warmup)


def memory_of(m: Measurement | None, attribute: str) -> float | None:
    return None if m is None or m.error else _gib(getattr(m, attribute))


def _cell(row: Row, side: str, value: float | None, digits: int = 3) -> str:
    m = row.ours if side == "ours" else row.reference
    if m is None:
        return "—"
    return "failed" if m.error else _fmt(value, digits)


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Row, Plan], str]
    reference: bool = False  # shown only when the reference runs


def _memory_columns(name: str, attribute: str) -> list[Column]:
    return [
        Column(f"{name} GiB ours", lambda r, p: _cell(r, "ours", memory_of(r.ours, attribute))),
        Column(f"{name} GiB ref", lambda r, p: _cell(r, "ref", memory_of(r.reference, attribute)), True),
        Column(f"{name} ours/ref", lambda r, p: _ratio_cell(r, memory_of(r.ours, attribute),
                                                           memory_of(r.reference, attribute)), True),
    ]


COLUMNS = [
    Column("model", lambda r, p: MODEL_NAMES[r.family] + (" (small)" if p.small else "")),
    Column("setting", lambda r, p: r.setting.name),
    *_memory_columns("alloc", "peak_allocated"),
    *_memory_columns("reserved", "peak_reserved"),
    Column("steps/s ours", lambda r, p: _cell(r, "ours", speed_of(r.ours, p))),
    Column("steps/s ref", lambda r, p: _cell(r, "ref", speed_of(r.reference, p)), True),
    Column("speed ours/ref", lambda r, p: _ratio_cell(r, speed_of(r.ours, p), speed_of(r.reference, p)), True),
    Column("MFU ours", lambda r, p: _cell(r, "ours", _mfu(r, r.ours, p), 2)),
    Column("MFU ref", lambda r, p: _cell(r, "ref", _mfu(r, r.reference, p), 2), True),
    Column("GFLOP/step", lambda r, p: _fmt(r.flops / 1e9, 4)),
]


def markdown_table(rows: list[Row], plan: Plan) -> str:
    columns = [c for c in COLUMNS if plan.reference_script or not c.reference]
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(c.cell(row, plan) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def class_images_table(rows: list[Row]) -> str:
    lines = ["| model | images/s ours | images/s StableDiffusionPipeline | ours/ref | alloc GiB ours | alloc GiB ref | "
             "reserved GiB ours | reserved GiB ref |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ours, ref = (None if m.error else m.rate(CLASS_IMAGE_BATCH) for m in (row.ours, row.reference))
        cells = [MODEL_NAMES[row.family], _fmt(ours), _fmt(ref), _fmt(ours / ref if ours and ref else None),
                 *(_fmt(memory_of(m, attribute)) for attribute in ("peak_allocated", "peak_reserved")
                   for m in (row.ours, row.reference))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def whole_run_table(runs: list[dict]) -> str:
    lines = ["| model | cap GiB | preset | command | phase | s | alloc GiB | reserved GiB | within budget |",
             "|---|---:|---|---|---|---:|---:|---:|---|"]
    for run in runs:
        limit = card_budget(run["cap_gib"], SDXL_CARD_BUDGETS if run["family"] == "sdxl" else CARD_BUDGETS)
        preset = run["preset"] + ("+te" if run["family"] == "sdxl" and run.get("text_encoder") else "")
        for phase in run["phases"]:
            reserved = phase["reserved_gib"]
            ok = "n/a" if reserved is None else ("yes" if reserved <= limit else f"NO (> {limit})")
            lines.append(f"| {MODEL_NAMES[run['family']]} | {run['cap_gib']:g} | {preset} | "
                         f"{phase['command']} | {phase['phase']} | {phase['seconds']:.1f} | "
                         f"{_fmt(phase['allocated_gib'])} | {_fmt(reserved)} | {ok} |")
        lines += [f"| {MODEL_NAMES[run['family']]} | {run['cap_gib']:g} | {run['preset']} | failed: {error} |"
                  for error in run["errors"]]
    return "\n".join(lines)


def report(rows: list[Row], plan: Plan, class_rows: list[Row] = (), whole_runs: list[dict] = ()) -> str:
    cuda = torch.cuda.is_available()
    measured = [m for row in rows for m in (row.ours, row.reference) if m and not m.error]
    devices = sorted({m.device for m in measured}) or ["cpu"]
    torches = sorted({m.torch for m in measured})
    lines = [
        "## DreamBooth training: ours vs diffusers' train_dreambooth.py" if plan.reference_script
        else "## DreamBooth training: ours",
        "",
        f"Device: {', '.join(devices)}; torch {', '.join(torches)}; threads {plan.threads or 'default'}. "
        f"Batch 1 + 1 class image (prior preservation), {plan.resolution} px, {plan.steps} steps of which the first "
        f"{plan.warmup} are warm-up; {'tiny' if plan.small else 'full-size'} models with random weights.",
        "",
        markdown_table(rows, plan),
        "",
        "- steps/s: 1 / median step time after the warm-up. Peak memory: torch.cuda.max_memory_allocated / "
        "max_memory_reserved over the whole run (fresh process each run).",
        f"- MFU: GFLOP/step (one forward + backward of the UNet on 2 latents, and of the text encoder when it is "
        f"trained; FlopCounterMode, no recomputation) x steps/s / peak "
        f"{_fmt(plan.peak_tflops, 4)} TFLOPS ({plan.peak_source}).",
    ]
    if plan.reference_script:
        lines += ["- The reference gets the same FLOP count although it also runs the VAE encoder (and a frozen text "
                  "encoder) every step where we use cached results.",
                  "- Ratios are ours/reference: memory below 1 means we use less; speed above 1 means we are "
                  "faster. '—': not run (see notes)."]
    if not cuda:
        compared = "the speed ratios" if plan.reference_script else "speeds relative to each other"
        lines.append(f"- No CUDA device: memory columns are n/a and only {compared} are meaningful (CPU timings "
                     "say nothing about GPU speed or memory).")
    lines += [f"- {MODEL_NAMES[r.family]} {r.setting.name} reference: {r.reference_note}"
              for r in rows if r.reference_note and plan.reference_script]
    lines += [f"- {MODEL_NAMES[r.family]} {r.setting.name} {side} failed: {m.error}"
              for r in [*rows, *class_rows] for side, m in (("ours", r.ours), ("reference", r.reference))
              if m and m.error]
    if class_rows:
        lines += ["", "## Class images: ours vs diffusers' StableDiffusionPipeline", "",
                  f"{plan.class_images} images of 'a dog', {plan.resolution} px, 30 steps euler_a, guidance 7.5, "
                  f"batch {CLASS_IMAGE_BATCH}, half precision on a GPU (fp32 on a CPU); images/s after the first "
                  "batch. Ours writes each PNG to the cache; the pipeline keeps its images in memory.", "",
                  class_images_table(class_rows)]
    if whole_runs:
        lines += ["", "## The command line's whole run under memory caps", "",
                  "Each command in a process capped with torch.cuda.set_per_process_memory_fraction, the memory "
                  "preset of a card that size; pick-token, then train (8 class images generated, the text encoder "
                  f"trained (SDXL's two: only capped at {SDXL_TE_CAP:g} GiB, a 16 GB card), {plan.steps} steps, a "
                  "preview), then sample. Per phase, the peak the engine logs.", "",
                  whole_run_table(whole_runs)]
    return "\n".join(lines) + "\n"


def results_json(rows: list[Row], plan: Plan, class_rows: list[Row] = (), whole_runs: list[dict] = ()) -> str:
    def side(row: Row, m: Measurement | None):
        if m is None:
            return None
        return {**dataclasses.asdict(m), "step_times_s": m.step_times(plan.warmup),
                "steps_per_second": speed_of(m, plan), "mfu": _mfu(row, m, plan)}

    meta = {key: value for key, value in dataclasses.asdict(plan).items() if key not in ("settings", "work_dir")}
    out_rows = []
    for row in rows:
        out_rows.append({"family": row.family, "setting": row.setting.name, "ours_config": row.setting.ours,
                         "reference_flags": row.setting.reference, "flops_per_step": row.flops,
                         "ours": side(row, row.ours), "reference": side(row, row.reference),
                         "reference_note": row.reference_note})
    class_out = [{"family": r.family, "ours": dataclasses.asdict(r.ours), "reference": dataclasses.asdict(r.reference),
                  "images_per_second": {side: None if m.error else m.rate(CLASS_IMAGE_BATCH)
                                        for side, m in (("ours", r.ours), ("reference", r.reference))}}
                 for r in class_rows]
    return json.dumps({"plan": meta, "rows": out_rows, "class_images": class_out, "whole_runs": list(whole_runs)},
                      indent=1)


def write_outputs(paths: list[str], markdown: str, json_text: str) -> None:
    for path in map(Path, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json_text if path.suffix == ".json" else markdown)
        progress(f"wrote {path}")


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peak GPU memory, steps/s and MFU of our DreamBooth loop vs diffusers' train_dreambooth.py, "
                    "for a matrix of settings, as a markdown table; optionally class-image generation against "
                    "StableDiffusionPipeline, and the command line's whole run under memory caps.",
        epilog=f"Setting parts (join with '+'): {', '.join(all_atoms())}. Default matrix on a GPU: "
               f"{' '.join(default_matrix(True))}; on a CPU: {' '.join(default_matrix(False))}.")
    parser.add_argument("--family", choices=("sd1", "sd2", "sdxl", "both"), default="sd1",
                        help="sdxl: against diffusers' train_text_to_image_sdxl.py (give it as --reference-script), "
                             "1024 px by default ('both': sd1 and sd2)")
    parser.add_argument("--cap-presets", action="store_true",
                        help="run each memory preset of the matrix with the process's GPU memory capped at what its "
                             "card leaves (torch.cuda.set_per_process_memory_fraction): 8GB 7.6, 12GB 11.6, 24GB "
                             f"23.6 GiB; for SDXL, a 12GB+te run at {SDXL_TE_CAP} (a 16 GB card)")
    parser.add_argument("--small", action="store_true", help="tiny models (bench/models.py) for a CPU")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing (at least 1)")
    parser.add_argument("--resolution", type=int, help="training size in px (default 512; 64 with --small)")
    parser.add_argument("--settings", nargs="*", metavar="NAME",
                        help="settings to run, e.g. fp32 bf16+8bit+gc (none at all: skip the training matrix)")
    parser.add_argument("--class-images", type=int, default=0, metavar="N",
                        help="also time generating N class images, ours vs StableDiffusionPipeline (e.g. 16)")
    parser.add_argument("--whole-run", nargs="*", type=float, metavar="GIB",
                        help="also run the command line's whole run (pick-token, train, sample) with each process's "
                             "GPU memory capped at these GiB (default 5.8 7.6 11.6: 6, 8 and 12 GB cards)")
    parser.add_argument("--reference-script", default=DEFAULT_REFERENCE_SCRIPT,
                        help="copy of diffusers' examples/dreambooth/train_dreambooth.py (never commit it; "
                             "default $DREAMBOOTH_REFERENCE_SCRIPT)")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON,
                        help="Python that runs the reference (needs torchvision, accelerate, diffusers): a path or "
                             "a command name (default $DREAMBOOTH_REFERENCE_PYTHON, else python3)")
    parser.add_argument("--reference-extra-args", default="",
                        help="more flags for the reference script, written with '=': "
                             "--reference-extra-args='--set_grads_to_none'")
    parser.add_argument("--no-reference", action="store_true", help="benchmark our loop only")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak bf16/fp16 TFLOPS (default: from a table)")
    parser.add_argument("--threads", type=int, help="torch threads in every run (default: torch's choice)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--work-dir", help="keep models, logs and results here (default: a temporary folder)")
    parser.add_argument("--out", action="append", default=[], metavar="PATH",
                        help="also write the results: .md (the table) or .json (everything); repeatable")
    args = parser.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        parser.error(f"need 1 <= --warmup < --steps (got --warmup {args.warmup}, --steps {args.steps})")
    if args.whole_run == []:
        args.whole_run = [11.6, SDXL_TE_CAP] if args.family == "sdxl" else [5.8, 7.6, 11.6]
    if not args.no_reference:
        if not args.reference_script or not Path(args.reference_script).is_file():
            parser.error(f"--reference-script {args.reference_script!r} is not a file; give diffusers' "
                         "train_dreambooth.py (train_text_to_image_sdxl.py for sdxl), or run with --no-reference")
        found = shutil.which(args.reference_python)
        if found is None:
            parser.error(f"--reference-python {args.reference_python!r} is neither a file nor a command on PATH; "
                         "give the Python that has torchvision, or run with --no-reference")
        args.reference_python = found
    names = default_matrix(torch.cuda.is_available(), args.family) if args.settings is None else args.settings
    try:
        args.setting_list = [parse_setting(name) for name in names]
    except ValueError as error:
        parser.error(str(error))
    return args


def make_plan(args: argparse.Namespace, work_dir: Path) -> Plan:
    tflops, source = peak_tflops(args.peak_tflops)
    return Plan(
        families=["sd1", "sd2"] if args.family == "both" else [args.family],
        settings=args.setting_list, small=args.small, steps=args.steps, warmup=args.warmup,
        resolution=args.resolution or (64 if args.small else NATIVE_RESOLUTION.get(args.family, 512)),
        work_dir=work_dir,
        reference_script=None if args.no_reference else str(Path(args.reference_script).resolve()),
        reference_python=args.reference_python, reference_extra_args=shlex.split(args.reference_extra_args),
        threads=args.threads, timeout=args.timeout, peak_tflops=tflops, peak_source=source,
        class_images=args.class_images, caps=tuple(args.whole_run or ()), cap_presets=args.cap_presets)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="dreambooth_bench_")).resolve()
    plan = make_plan(args, work_dir)
    rows, class_rows, whole_runs = run_matrix(plan)
    markdown = report(rows, plan, class_rows, whole_runs)
    print(markdown)
    write_outputs(args.out, markdown, results_json(rows, plan, class_rows, whole_runs))
    failed = (any(m and m.error for row in [*rows, *class_rows] for m in (row.ours, row.reference))
              or any(run["errors"] for run in whole_runs))
    if failed:
        progress(f"some runs failed; their logs are in {work_dir}")
    elif not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
