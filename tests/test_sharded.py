"""Sharded data parallel (trainer/sharding.py, PyTorch FSDP) on the CPU: two processes on the gloo backend, each
holding half of the trained weights, gradients and optimizer state, against one unsharded process with the same
global batch and draws."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_data_parallel import command, kill_at, max_difference, run
from tests.tiny import tiny_bundle
from trainer.checkpoint import save_checkpoint

pytestmark = pytest.mark.slow
SHARDED_SAYS = "Sharded (FSDP): each process holds 1/2 of the trained weights, their gradients and the optimizer's state"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sharded")
    paths = {family: folder / f"tiny-{family}.safetensors" for family in ("sd1", "sdxl")}
    for family, path in paths.items():
        save_checkpoint(tiny_bundle(family), path, {}, dtype=torch.float32)
    return paths


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_two_sharded_processes_learn_what_one_process_with_the_global_batch_does(bases, family, tmp_path):
    # The text encoders trained too (SDXL's two: what sharding is for). SD 1.x: 5 photos in global batches of 2, so
    # every third step one process trains on nothing, at weight 0; and previews every 2 steps, which every process
    # draws together (the UNet's blocks are gathered across them).
    steps = ["--max-train-steps", "6" if family == "sd1" else "3", "--train-text-encoder"]
    if family == "sdxl":
        steps += ["--resolution", "64"]
    else:
        steps += ["--sample-every", "2", "--sample-prompts", "a zwx dog"]
    one = run(command(bases[family], tmp_path / "one.safetensors", 1, 2, *steps))
    two = run(command(bases[family], tmp_path / "two.safetensors", 2, 1, *steps, "--shard"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert (two.stdout + two.stderr).count(SHARDED_SAYS) == 1
    base, trained = load_file(bases[family]), load_file(tmp_path / "one.safetensors")
    last_encoder = "conditioner.embedders.1." if family == "sdxl" else "cond_stage_model."
    assert any(not torch.equal(base[k], trained[k]) for k in trained if k.startswith(last_encoder))  # it trained
    assert max_difference(bases[family], tmp_path / "one.safetensors") > 1e-3
    assert max_difference(tmp_path / "one.safetensors", tmp_path / "two.safetensors") < 1e-6


def test_bf16_weights_are_rounded_with_the_draws_one_process_makes(bases, tmp_path):
    # Each shard takes its part of the random bits drawn for its whole tensor; the runs then differ only where float
    # rounding of the summed gradients tips a stochastic rounding (as unsharded data parallel does: ~6% of the
    # weights, by 1 bf16 step). With each shard drawing bits of its own, 70% differ, by 60% of the mean movement.
    steps = ["--max-train-steps", "6", "--bf16-weights", "--mixed-precision", "bf16"]
    one = run(command(bases["sd1"], tmp_path / "one.safetensors", 1, 2, *steps))
    two = run(command(bases["sd1"], tmp_path / "two.safetensors", 2, 1, *steps, "--shard"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    base, a, b = (load_file(path) for path in (bases["sd1"], tmp_path / "one.safetensors", tmp_path / "two.safetensors"))
    unet = [k for k in base if k.startswith("model.diffusion_model.")]
    base, a, b = (torch.cat([w[k].float().flatten() for k in unet]) for w in (base, a, b))
    moved, apart = (a - base).abs().mean(), (b - a).abs().mean()
    assert (a != base).float().mean() > 0.99  # every weight moved
    assert apart < 0.05 * moved and (a != b).float().mean() < 0.15, (apart / moved, (a != b).float().mean())


def test_fused_backward_steps_each_shard_in_backward_as_one_process_does(bases, tmp_path):
    # Clipped hard (max_grad_norm 0.05: most tensors are clipped, each by its own norm), which a process takes over
    # all shards of a tensor, not its own: clipping by a shard's norm alone clips less and lands elsewhere.
    steps = ["--max-train-steps", "4", "--train-text-encoder", "--fused-backward"]
    one = run(command(bases["sd1"], tmp_path / "one.safetensors", 1, 2, *steps, "--max-grad-norm", "0.05"))
    two = run(command(bases["sd1"], tmp_path / "two.safetensors", 2, 1, *steps, "--max-grad-norm", "0.05", "--shard"))
    unclipped = run(command(bases["sd1"], tmp_path / "unclipped.safetensors", 1, 2, *steps, "--max-grad-norm", "0"))
    for done in (one, two, unclipped):
        assert done.returncode == 0, done.stderr[-3000:]
    assert SHARDED_SAYS in two.stdout and "fused backward" in two.stdout
    moved = max_difference(bases["sd1"], tmp_path / "one.safetensors")
    assert max_difference(tmp_path / "one.safetensors", tmp_path / "unclipped.safetensors") > 0.5 * moved
    assert max_difference(tmp_path / "one.safetensors", tmp_path / "two.safetensors") < 1e-6


def test_fused_backward_steps_each_units_shards_before_the_next_units_arrive(tmp_path):
    # In one process (FSDP over a group of 1): every tensor is stepped once, inside backward(), and when one is
    # stepped the gradients' shards that exist belong to at most two units (the one being stepped, the one
    # arriving), never to all of them: the memory fused_backward saves.
    import torch.distributed as dist

    from trainer.config import TrainConfig
    from trainer.distributed import Processes
    from trainer.optim import make_optimizer
    from trainer.sharding import Shards

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        unet = tiny_bundle("sd1").unet.train()
        shards = Shards({"unet": unet}, Processes(size=1, sharded=True))
        cfg = TrainConfig(fused_backward=True, optimizer="adamw", learning_rate=1e-3)
        optimizer = make_optimizer(cfg, shards.local, torch.device("cpu"), shards.windows)
        stepped, holding = [], []
        step_tensor = optimizer.step_tensor

        def watched(i, coef=None):
            stepped.append(i)
            holding.append({shards.unit_of[j] for j, (local, param) in enumerate(zip(shards.local, shards.params))
                            if local.grad is not None or param.grad is not None})
            step_tensor(i, coef)

        optimizer.step_tensor = watched
        before = [local.detach().clone() for local in shards.local]
        generator = torch.Generator().manual_seed(0)
        noisy, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 7, 32, generator=generator)
        loss = unet(noisy, torch.tensor([10]), encoder_hidden_states=context).sample.pow(2).mean()
        with shards.stepping_in_backward(optimizer, max_grad_norm=1.0):
            loss.backward()
            assert len(stepped) < len(shards.params)  # (the roots: stepped once backward() has returned)
        assert sorted(stepped) == list(range(len(shards.params)))
        assert len(set(shards.unit_of)) > 10 and max(len(units) for units in holding) <= 2
        assert all(local.grad is None and param.grad is None for local, param in zip(shards.local, shards.params))
        assert all(not torch.equal(old, new) for old, new in zip(before, shards.local))
    finally:
        dist.destroy_process_group()


def test_sdxl_with_both_text_encoders_on_bf16_weights_and_fused_backward_sharded(bases, tmp_path):
    # What SDXL's 12 GB preset is on a GPU with bf16, sharded (each lever on shards): against one process with the
    # global batch, the same up to 8-bit blocks of a shard and float rounding tipping a stochastic rounding.
    pytest.importorskip("bitsandbytes")
    steps = ["--max-train-steps", "3", "--train-text-encoder", "--resolution", "64", "--mixed-precision", "bf16",
             "--bf16-weights", "--fused-backward", "--gradient-checkpointing", "--optimizer", "adamw8bit"]
    one = run(command(bases["sdxl"], tmp_path / "one.safetensors", 1, 2, *steps))
    two = run(command(bases["sdxl"], tmp_path / "two.safetensors", 2, 1, *steps, "--shard"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    base, a, b = (load_file(path) for path in (bases["sdxl"], tmp_path / "one.safetensors",
                                               tmp_path / "two.safetensors"))
    for prefix in ("model.diffusion_model.", "conditioner.embedders.0.", "conditioner.embedders.1."):
        keys = [k for k in base if k.startswith(prefix)]
        w0, w1, w2 = (torch.cat([w[k].float().flatten() for k in keys]) for w in (base, a, b))
        moved, apart = (w1 - w0).abs().mean(), (w2 - w1).abs().mean()
        assert (w1 != w0).float().mean() > 0.9, prefix  # it trained
        assert apart < 0.05 * moved, (prefix, apart / moved)


def test_a_memory_presets_adafactor_becomes_8bit_adamw_when_sharded(bases, tmp_path):
    pytest.importorskip("bitsandbytes")
    two = run(command(bases["sdxl"], tmp_path / "two.safetensors", 2, 1, "--max-train-steps", "1", "--resolution",
                      "64", "--memory-preset", "12GB", "--shard"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Sharded: optimizer adamw8bit instead of the memory preset '12 GB''s adafactor" in two.stdout
    assert "gradient checkpointing, fused backward" in two.stdout  # the preset's other levers stay


def optimizer_elements(path: Path) -> int:
    with safe_open(path, "pt") as file:
        return sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys())


@pytest.mark.parametrize("levers", [[], ["--fused-backward", "--bf16-weights", "--mixed-precision", "bf16"]],
                         ids=["adamw", "fused-bf16-weights"])
def test_a_killed_sharded_run_resumes_to_the_uninterrupted_runs_weights(bases, tmp_path, levers):
    steps = ["--max-train-steps", "8", "--checkpoint-every", "2", *levers, "--shard"]
    straight = run(command(bases["sd1"], tmp_path / "straight.safetensors", 2, 1, *steps))
    assert straight.returncode == 0, straight.stderr[-3000:]

    output = tmp_path / "killed.safetensors"
    kill_at(command(bases["sd1"], output, 2, 1, *steps), "Training 3/8", output)  # past the state of step 2

    # Each process saved its own half of the optimizer's state (AdamW: two moments per trained weight).
    state = tmp_path / "killed.state"
    meta = json.loads((state / "state.json").read_text())
    assert meta["step"] == 2 and meta["processes"] == 2 and meta["sharded"] is True
    weights = sum(t.numel() for t in load_file(state / "weights.tensors").values())
    moments = 2 * weights  # one unsharded AdamW's state
    halves = [optimizer_elements(state / name) for name in ("optimizer.tensors", "optimizer.rank1.tensors")]
    assert all(0.45 * moments < half < 0.55 * moments for half in halves), (halves, moments)
    assert moments <= sum(halves) <= moments + 10_000  # (+ the step counts, and with bf16 weights the rounds)

    unsharded = run(command(bases["sd1"], output, 2, 1, *[s for s in steps[:-1] if s != "--fused-backward"]))
    assert unsharded.returncode != 0
    assert "was saved by a sharded run; resume it with --shard" in unsharded.stderr

    resumed = run(command(bases["sd1"], output, 2, 1, *steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 2" in resumed.stdout
    assert max_difference(tmp_path / "straight.safetensors", output) == 0  # the same draws, the same arithmetic


def test_accelerates_fsdp_config_shards_with_8bit_adamw(bases, tmp_path):
    pytest.importorskip("bitsandbytes")
    steps = ["--max-train-steps", "4", "--optimizer", "adamw8bit"]
    one = run(command(bases["sd1"], tmp_path / "one.safetensors", 1, 2, *steps))
    # accelerate launch --use_fsdp: what an accelerate config with distributed_type FSDP does
    launch = [part for part in command(bases["sd1"], tmp_path / "two.safetensors", 2, 1, *steps,
                                       launcher="accelerate") if part != "--multi_gpu"]
    two = run(launch[:3] + ["--use_fsdp"] + launch[3:])
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert SHARDED_SAYS in two.stdout
    # 8-bit moments are quantized in blocks of each process's shard instead of each whole tensor: the same
    # optimizer up to that quantization (observed 0.1% of how far the weights moved).
    moved = max_difference(bases["sd1"], tmp_path / "one.safetensors")
    assert max_difference(tmp_path / "one.safetensors", tmp_path / "two.safetensors") < 0.01 * moved


def test_what_does_not_combine_with_sharding_is_refused_with_the_reason(bases, tmp_path):
    refused = run(command(bases["sd1"], tmp_path / "refused.safetensors", 2, 1, "--max-train-steps", "2", "--shard",
                          "--optimizer", "adafactor", "--mixed-precision", "fp16"))
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "Sharded training (--shard, or accelerate's FSDP) does not combine with mixed_precision 'fp16'" in said
    assert "nor with optimizer 'adafactor': its factored statistics" in said
    assert not (tmp_path / "refused.safetensors").exists()
