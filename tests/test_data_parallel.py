"""Data parallel on the CPU: two processes on the gloo backend, started by `accelerate launch --multi_gpu` (and
torchrun), against one process with the same global batch."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import PHOTOS, tiny_bundle
from trainer.checkpoint import save_checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dp") / "tiny.safetensors"
    save_checkpoint(tiny_bundle("sd1"), path, {}, dtype=torch.float32)
    return path


LAUNCHERS = {  # both set what the engine reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); gloo on a CPU
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"],
}


def command(base: Path, output: Path, processes: int, batch: int, *extra: str, launcher: str = "torchrun") -> list[str]:
    # adam_epsilon 1: AdamW's update is then nearly linear in the gradient, so the float rounding of summing the
    # processes' gradients stays at float size; with the default 1e-8 an element whose gradient is ~0 takes
    # +-learning_rate on the sign of its rounding, which no data-parallel trainer reproduces.
    train = ["-m", "trainer", "train", "--model", str(base), "--images", str(PHOTOS / "dog"), "--class-dir",
             str(PHOTOS / "cat"), "--identifier", "zwx", "--class-noun", "dog", "--resolution", "32",
             "--learning-rate", "0.1", "--adam-epsilon", "1", "--optimizer", "adamw", "--device", "cpu",
             "--save-dtype", "fp32", "--batch-size", str(batch), "--output", str(output), *extra]
    return (LAUNCHERS[launcher] + [str(processes)] if processes > 1 else [sys.executable]) + train


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def kill_at(cmd: list[str], line_start: str, output: Path) -> None:
    """Start a run and SIGKILL all its processes when it prints a line starting with `line_start`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith(line_start):
            # the launcher and each worker (torchrun starts them in sessions of their own): all name the output
            subprocess.run(["pkill", "-KILL", "-f", str(output)], check=True)
            break
    process.wait(60)
    assert not output.exists()


def max_difference(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


def test_two_processes_with_batch_1_learn_what_one_process_with_batch_2_does(base, tmp_path):
    # 5 photos, global batch 2: every third step has one photo, so one process trains on nothing (at weight 0).
    steps = ["--max-train-steps", "6", "--train-text-encoder"]
    one = run(command(base, tmp_path / "one.safetensors", 1, 2, *steps))
    two = run(command(base, tmp_path / "two.safetensors", 2, 1, *steps, launcher="accelerate"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    changed = max_difference(base.parent / "tiny.safetensors", tmp_path / "one.safetensors")
    assert changed > 1e-3  # it trained
    assert max_difference(tmp_path / "one.safetensors", tmp_path / "two.safetensors") < 1e-6
    said = two.stdout + two.stderr
    assert said.count("Data parallel: 2 processes x batch 1 = a global batch of 2; gradients averaged; learning rate "
                      "0.1 as given (not scaled by the number of processes)") == 1  # rank 0 speaks, once
    assert said.count("Saved ") == 1
    losses = re.findall(r"^Training \d+/6 loss (\S+)", one.stdout, re.M)
    assert len(losses) == 6 and re.findall(r"^Training \d+/6 loss (\S+)", two.stdout, re.M) == losses  # global


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_runs_weights(base, tmp_path):
    steps = ["--max-train-steps", "8", "--checkpoint-every", "2"]  # killed past the state of step 2
    straight = run(command(base, tmp_path / "straight.safetensors", 2, 1, *steps))
    assert straight.returncode == 0, straight.stderr[-3000:]

    output = tmp_path / "killed.safetensors"
    kill_at(command(base, output, 2, 1, *steps), "Training 3/8", output)

    other_count = run(command(base, output, 1, 2, *steps))  # its global batch is 2 too, but another stream split
    assert other_count.returncode != 0 and "saved by a run on 2 process(es); this one has 1" in other_count.stderr

    resumed = run(command(base, output, 2, 1, *steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step" in resumed.stdout
    assert max_difference(tmp_path / "straight.safetensors", output) == 0  # the same draws, the same sums


def test_ctrl_c_through_the_launcher_stops_every_process_at_one_step_with_a_resumable_state(base, tmp_path):
    output = tmp_path / "stopped.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command(base, output, 2, 1, "--max-train-steps", "2000", launcher="accelerate"),
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said = []
    for line in process.stdout:
        said.append(line)
        if line.startswith("Training 1/2000"):
            process.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does: the launcher passes it on
    process.wait(120)
    said = "".join(said)
    stopped = re.findall(r"training cancelled at step (\d+)", said)
    assert len(stopped) == 1 and said.count("Stopping after this step") == 1, said[-2000:]
    state = json.loads((tmp_path / "stopped.state" / "state.json").read_text())
    assert state["step"] == int(stopped[0]) < 2000 and state["processes"] == 2


def test_the_levers_that_step_inside_backward_are_refused_with_several_processes(base, tmp_path):
    refused = run(command(base, tmp_path / "fused.safetensors", 2, 1, "--max-train-steps", "2", "--fused-backward"))
    assert refused.returncode != 0
    assert "fused_backward: steps the optimizer inside the backward pass" in refused.stdout + refused.stderr
    assert not (tmp_path / "fused.safetensors").exists()


def test_class_images_are_drawn_once_by_the_processes_together_as_one_process_draws_them(base, tmp_path):
    def train(processes: int, name: str) -> subprocess.CompletedProcess:
        cmd = command(base, tmp_path / f"{name}.safetensors", processes, 3 - processes, "--max-train-steps", "1",
                      "--prior-cache-dir", str(tmp_path / name), "--num-class-images", "5", "--prior-steps", "2")
        at = cmd.index("--class-dir")
        return run(cmd[:at] + cmd[at + 2:])  # no class images given: the cache is filled

    together, alone = train(2, "two"), train(1, "one")
    assert together.returncode == 0, together.stderr[-3000:]
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "Class images: 5 of 'a dog' (cached in " in together.stdout and "drawn by 2 processes)" in together.stdout
    drawn = {name: sorted((tmp_path / name).rglob("*.png")) for name in ("two", "one")}
    assert [p.name for p in drawn["two"]] == [f"{i:05d}.png" for i in range(5)]
    assert [p.read_bytes() for p in drawn["two"]] == [p.read_bytes() for p in drawn["one"]]
    manifest = json.loads(next((tmp_path / "two").rglob("manifest.json")).read_text())
    assert manifest["count"] == 5 and not list((tmp_path / "two").rglob("*.tmp"))
