"""bench/step_profile.py: its counter counts what a GPU would launch and wait for, its slim model has every tensor of
the full one, its GPU profile times one step, and what it found stays true: the fused per-tensor step launches only
the kernels it needs, and bitsandbytes' wait after every tensor stays out of the step."""
import collections
import types

import pytest
import torch
from torch.autograd import DeviceType

import trainer.optim
from bench import step_profile
from bench.memory_model import cuda_defaults
from bench.models import random_bundle, slim_configs
from tests.tiny import one_thread  # noqa: F401  (autouse: one torch thread in this module)
from trainer.fused import FusedBackward
from trainer.models import build_bundle, shipped_configs


def test_the_counter_counts_launches_and_waits_not_views():
    x = torch.arange(6.0)
    with step_profile.Counter() as counter:
        y = x.view(2, 3).t()  # views: no kernel
        z = y + 1
        z.sum().item()
        (z > 3).nonzero()  # its size depends on the values: the host waits to know it
        z.tolist()
    assert counter.kernels == collections.Counter({"add": 1, "sum": 1, "gt": 1})
    assert counter.syncs == collections.Counter({".item()": 1, "data-dependent nonzero": 1, ".tolist()": 1})
    z.tolist()  # counted only while inside
    assert counter.syncs[".tolist()"] == 1


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_the_slim_model_has_every_tensor_of_the_full_one(family):
    full = shipped_configs(family)
    with torch.device("meta"):
        real = build_bundle(family, "epsilon", full.unet, full.vae, full.text, source_name="full", source_hash="full")
    slim = random_bundle(family, small=True, configs=slim_configs(family))
    for name in ("unet", "text_encoder", "vae"):
        full_shapes = {key: tensor.dim() for key, tensor in getattr(real, name).named_parameters()}
        slim_shapes = {key: tensor.dim() for key, tensor in getattr(slim, name).named_parameters()}
        assert slim_shapes == full_shapes, name
    assert sum(p.numel() for p in slim.unet.parameters()) < 1e6  # 860 M in SD 1.5's: nearly nothing to compute


@pytest.mark.parametrize("bf16_weights, most", [(False, 7), (True, 15)])
def test_one_tensors_fused_step_launches_only_what_it_needs(bf16_weights, most):
    """Counted as on a GPU (torch's multi-tensor paths on): clipping (its norm, 4 scalar ops, the scaling), the 8-bit
    update, and with bf16 weights the two fp32 copies in and the rounding out (bits drawn, added, masked, copied,
    NaN kept). torch's clip_grad_norm_ took 2 more (a multi-tensor norm and a stack, for the one tensor)."""
    pytest.importorskip("bitsandbytes")
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    params = [torch.nn.Parameter(torch.randn(64, 80, dtype=dtype)) for _ in range(2)]  # 8-bit state: >= 4096
    make = trainer.optim.adamw8bit_without_syncs()
    optimizer = FusedBackward(params, lambda tensors: make(tensors, lr=1e-3), max_grad_norm=1.0,
                              rounding_seed=0 if bf16_weights else None)
    with cuda_defaults():
        params[1].grad = torch.randn_like(params[1])
        optimizer.step_tensor(1)  # the first step makes the state
        params[1].grad = torch.randn_like(params[1])
        with step_profile.Counter() as counter:
            optimizer.step_tensor(1)
    assert counter.kernels["optimizer_update_8bit_blockwise"] == 1
    assert not counter.syncs
    assert not [name for name in counter.kernels if name.startswith("_foreach") or name == "stack"]
    assert sum(counter.kernels.values()) <= most


def test_the_profile_sees_bitsandbytes_wait_after_every_tensor_and_ours_does_not(monkeypatch):
    pytest.importorskip("bitsandbytes")
    trained = sum(1 for _ in random_bundle("sd1", small=True).unet.parameters())
    ours = step_profile.run("12GB", steps=1, count=True, small=True)
    assert ours["syncs"] == collections.Counter({".tolist()": 1})  # the step's losses, in one transfer
    monkeypatch.setattr(trainer.optim, "_no_sync_class", lambda base: base)  # bitsandbytes' own AdamW8bit
    theirs = step_profile.run("12GB", steps=1, count=True, small=True)
    assert theirs["syncs"]["bitsandbytes sync_gpu"] == trained


def test_the_gpu_profiles_window_holds_exactly_one_step():
    # (On the CPU: no kernel launches or GPU time to see, but the same window of the same train().)
    profiled = step_profile.profile_on_device("fp32", "cpu", warmup=2, small=True)
    counted = step_profile.run("fp32", steps=1, count=True, small=True)
    assert profiled["ops"]["aten::mse_loss"] == counted["kernels"]["mse_loss"] > 0
    assert profiled["step_ms"] > 0 and profiled["unprofiled_ms"] > 0
    assert profiled["launches"] == 0 and profiled["gpu_busy_ms"] == 0


def test_the_gpu_summary_adds_the_gpus_time_and_counts_launches_and_waits():
    class Span:
        def __init__(self, us):
            self.us = us

        def elapsed_us(self):
            return self.us

    def event(name, device, us=1.0):
        return types.SimpleNamespace(name=name, device_type=device, time_range=Span(us))

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    events = [event("aten::mm", cpu), event("cudaLaunchKernel", cpu), event("sm90_gemm", cuda, 1500.0),
              event("cudaLaunchKernel", cpu), event("Memcpy DtoH", cuda, 500.0), event("cudaStreamSynchronize", cpu),
              event("cudaMemcpyAsync", cpu)]
    summary = step_profile.device_summary(events)
    assert summary["gpu_busy_ms"] == 2.0 and summary["launches"] == 2
    assert summary["waits"] == collections.Counter({"cudaStreamSynchronize": 1})


def test_the_gpu_mode_prints_a_row_per_setting(monkeypatch, capsys):
    real = step_profile.profile_on_device
    monkeypatch.setattr(step_profile, "profile_on_device", lambda setting, device, **kw: real(setting, "cpu", **kw))
    assert step_profile.main(["--gpu", "--small", "--settings", "fp32", "fp32+gc"]) == 0
    table = capsys.readouterr().out.split("| setting | step ms (profiled)")[1]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| fp32", "| fp32+gc"]
