"""fused_backward: the optimizer step inside the backward pass learns what the ordinary step learns, resumes exactly,
clips per tensor, never holds the model's gradients together, and leaves no hooks on the model."""
import json

import pytest
import torch

from trainer.__main__ import main
from trainer.callbacks import Callbacks, TrainingCancelled
from trainer.config import ConfigError
from trainer.fused import FusedBackward, PerTensorOptimizer
from trainer.loop import train
from trainer.state import state_dir_for
from tests.test_train import CrashAt, StopAfter, config, images, max_change, weights  # noqa: F401 (fixture)
from tests.tiny import tiny_bundle

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread in this module


def trainable(bundle, text_encoder=True) -> list[torch.nn.Parameter]:
    modules = [bundle.unet] + ([bundle.text_encoder] if text_encoder else [])
    return [p for m in modules for p in m.parameters()]


def same_weights(a, b, names=("unet", "text_encoder")) -> bool:
    for name in names:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        if not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


@pytest.mark.parametrize("optimizer, train_text_encoder", [("adamw", False), ("adamw", True), ("adamw8bit", True)])
def test_fused_steps_learn_exactly_what_the_ordinary_step_learns(images, tmp_path, optimizer, train_text_encoder):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    # A warm-up then cosine schedule: the per-tensor optimizers only match if the scheduler drives every one's lr.
    settings = dict(optimizer=optimizer, train_text_encoder=train_text_encoder, max_grad_norm=0.0, batch_size=2,
                    lr_scheduler="cosine", lr_warmup_steps=2, max_train_steps=4)
    runs, lrs = [], []
    for fused in (False, True):
        bundle, seen = tiny_bundle("sd1"), []
        before = weights(bundle.unet), weights(bundle.text_encoder)
        cb = Callbacks()
        cb.on_step = seen.append
        train(config(images, tmp_path / str(fused), fused_backward=fused, **settings), bundle=bundle, callbacks=cb)
        assert max_change(before[0], bundle.unet) > 1e-4  # it learned
        assert (max_change(before[1], bundle.text_encoder) > 1e-4) == train_text_encoder
        runs.append(bundle)
        lrs.append([s.lr for s in seen])
    assert lrs[0] == lrs[1] and len(set(lrs[0])) > 2  # the schedule really moved
    # Bit for bit: on CPU torch's AdamW defaults to the per-tensor (non-foreach) kernel, as fused_backward uses.
    assert same_weights(*runs)


def test_the_hook_clips_each_tensor_on_its_own_and_frees_its_gradient():
    big, small = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    g_big, g_small = torch.tensor([6.0, 8.0, 0.0, 0.0]), torch.tensor([0.3, 0.4, 0.0])  # norms 10 and 0.5
    # SGD with lr 1 and no momentum: each step is minus the gradient the optimizer was given.
    opt = FusedBackward([big, small], lambda tensors: torch.optim.SGD(tensors, lr=1.0), max_grad_norm=1.0)
    with opt.stepping_in_backward():
        ((big * g_big).sum() + (small * g_small).sum()).backward()
    seen_big, seen_small = -big.detach(), -small.detach()
    assert torch.allclose(seen_big, g_big / 10, rtol=1e-5)  # clipped to norm 1
    assert torch.linalg.vector_norm(seen_big).item() == pytest.approx(1.0, rel=1e-5)
    # The total norm (10.01) is over the limit too, yet the small gradient is untouched: clipping is per tensor.
    assert torch.equal(seen_small, g_small)
    assert big.grad is None and small.grad is None

    # Outside the context no hook runs: the gradient stays and nothing moves.
    (big * g_big).sum().backward()
    assert torch.equal(big.grad, g_big) and torch.equal(-big.detach(), seen_big)


def test_the_scheduler_drives_every_tensor_also_after_loading_a_state():
    from diffusers.optimization import get_scheduler

    def build():
        params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
        opt = FusedBackward(params, lambda tensors: torch.optim.AdamW(tensors, lr=1.0, foreach=False))
        return params, opt, get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=10)

    params, opt, sched = build()
    for _ in range(2):
        with opt.stepping_in_backward():
            sum(p.sum() for p in params).backward()
        opt.step()
        sched.step()
    assert [o.param_groups[0]["lr"] for o in opt.optimizers] == [0.8] * 3
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    assert [g["params"] for g in saved_opt["param_groups"]] == [[0], [1], [2]] and set(saved_opt["state"]) == {0, 1, 2}

    params2, opt2, sched2 = build()
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    sched2.step()
    assert [o.param_groups[0]["lr"] for o in opt2.optimizers] == [pytest.approx(0.7)] * 3
    assert all(torch.equal(o.state[p]["exp_avg"], opt.optimizers[i].state[params[i]]["exp_avg"])
               for i, (o, p) in enumerate(zip(opt2.optimizers, params2)))


@pytest.mark.parametrize("optimizer, interrupt", [("adamw", StopAfter), ("adamw8bit", CrashAt)])
def test_cancelled_and_resumed_fused_run_ends_with_the_same_weights(images, tmp_path, optimizer, interrupt):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    # Clipping on (per tensor) and a linear schedule, whose position must come back with the per-tensor lrs.
    settings = dict(fused_backward=True, optimizer=optimizer, max_train_steps=6, checkpoint_every=2, batch_size=2,
                    train_text_encoder=True, lr_scheduler="linear", max_grad_norm=1.0)
    straight = tiny_bundle("sd1")
    train(config(images, tmp_path / "straight", **settings), bundle=straight)

    cfg = config(images, tmp_path / "resumed", **settings)
    interrupted = tiny_bundle("sd1")
    with pytest.raises((RuntimeError, TrainingCancelled)):
        train(cfg, bundle=interrupted, callbacks=interrupt(3))
    saved = json.loads((state_dir_for(cfg.output) / "state.json").read_text())
    assert len(saved["optimizer"]["param_groups"]) == len(trainable(interrupted))  # saved one tensor at a time
    resumed = tiny_bundle("sd1")
    assert train(cfg, bundle=resumed).resumed_from == (2 if interrupt is CrashAt else 3)
    assert same_weights(straight, resumed)


@pytest.mark.parametrize("fused", [False, True])
def test_fused_backward_never_holds_the_models_gradients_together(images, tmp_path, fused):
    bundle = tiny_bundle("sd1")
    params = trainable(bundle)
    for p in params:
        p.requires_grad_(True)  # as training will; hooks need it
    peak = {"tensors": 0, "bytes": 0}

    def count_live_gradients(_):
        live = [p.grad for p in params if p.grad is not None]
        peak["tensors"] = max(peak["tensors"], len(live))
        peak["bytes"] = max(peak["bytes"], sum(g.numel() * g.element_size() for g in live))

    # Registered before train() adds its own, so each runs just after a gradient is complete, before it is used.
    handles = [p.register_post_accumulate_grad_hook(count_live_gradients) for p in params]
    try:
        train(config(images, tmp_path, fused_backward=fused, train_text_encoder=True, max_train_steps=2),
              bundle=bundle)
    finally:
        for handle in handles:
            handle.remove()
    total = sum(p.numel() * p.element_size() for p in params)
    if fused:
        assert peak["tensors"] == 1  # the one just completed; every earlier one was stepped and freed
        assert peak["bytes"] <= max(p.numel() * p.element_size() for p in params)  # at most the largest tensor's
    else:
        assert peak["tensors"] == len(params) and peak["bytes"] == total  # all of them wait for optimizer.step()


class FailInBackward(Callbacks):
    """Raises from inside loss.backward() (a gradient hook) at the given step, while the fused hooks are on."""

    def __init__(self, bundle, step):
        self.step, self.calls = step, 0
        self.param = bundle.unet.conv_in.weight
        self.param.requires_grad_(True)
        self.handle = self.param.register_post_accumulate_grad_hook(self.fail)

    def fail(self, _):
        self.calls += 1
        if self.calls == self.step:
            raise RuntimeError("simulated failure inside backward")


@pytest.mark.parametrize("ending", ["returns", "cancelled", "raises after a step", "raises inside backward"])
def test_no_hooks_stay_on_the_model(images, tmp_path, ending):
    bundle = tiny_bundle("sd1")
    callbacks = {"returns": None, "cancelled": StopAfter(2), "raises after a step": CrashAt(2)}.get(ending)
    if ending == "raises inside backward":
        callbacks = FailInBackward(bundle, 2)
    cfg = config(images, tmp_path, fused_backward=True, train_text_encoder=True, max_train_steps=3)
    if ending == "returns":
        train(cfg, bundle=bundle)
    else:
        with pytest.raises((RuntimeError, TrainingCancelled)):
            train(cfg, bundle=bundle, callbacks=callbacks)
    if ending == "raises inside backward":
        callbacks.handle.remove()

    # A backward pass now must leave every gradient in place and every weight as it is.
    params = trainable(bundle)
    assert all(p.requires_grad for p in params)
    before = [p.detach().clone() for p in params]
    ids = bundle.tokenizer(["a zwx dog"], padding="max_length", max_length=bundle.tokenizer.model_max_length,
                           return_tensors="pt").input_ids
    cond = bundle.text_encoder(ids)[0]
    bundle.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), cond).sample.square().mean().backward()
    assert all(p.grad is not None for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_fp16_is_refused_with_advice(images, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="fused_backward.*bf16"):
        config(images, tmp_path, fused_backward=True, mixed_precision="fp16").validate()
    # 'auto' means fp16 on a GPU without bf16: refused before any loading
    import trainer.device
    monkeypatch.setattr(trainer.device, "resolve_precision", lambda name, device: torch.float16)
    with pytest.raises(ConfigError, match="fused_backward.*'no'"):
        train(config(images, tmp_path, fused_backward=True, mixed_precision="auto"), bundle=tiny_bundle("sd1"))


def test_the_command_line_offers_it_and_says_the_cost(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--fused-backward" in text and "each tensor's gradient on its own" in text


def test_the_per_tensor_8bit_step_runs_hooks_registered_on_its_optimizers():
    # (bench/memory_model.py measures each tensor's step through them; step_one skips only torch's wrapper)
    pytest.importorskip("bitsandbytes")
    from trainer.optim import adamw8bit_without_syncs

    param, seen = torch.nn.Parameter(torch.randn(64, 80)), []
    optimizer = PerTensorOptimizer([param], lambda tensors: adamw8bit_without_syncs()(tensors, lr=1e-3))
    inner = optimizer.optimizers[0]
    inner.register_step_pre_hook(lambda opt, args, kwargs: seen.append(("before", opt, param.clone())))
    inner.register_step_post_hook(lambda opt, args, kwargs: seen.append(("after", opt, param.clone())))
    param.grad = torch.randn_like(param)
    optimizer.step()
    assert [(when, opt) for when, opt, _ in seen] == [("before", inner), ("after", inner)]
    assert not torch.equal(seen[0][2], seen[1][2])  # the update ran between them
