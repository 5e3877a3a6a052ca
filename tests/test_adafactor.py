"""optimizer 'adafactor': transformers' Adafactor at the run's learning rate, without a first moment; its update is
the paper's factored one, it learns the same through the fused backward pass, resumes exactly, and keeps bf16 weights
through their fp32 shadows."""
import math

import pytest
import torch
from transformers.optimization import Adafactor

from trainer.callbacks import TrainingCancelled
from trainer.config import TrainConfig
from trainer.fused import FusedBackward
from trainer.loop import train
from trainer.optim import make_optimizer
from tests.test_fused import same_weights
from tests.test_train import StopAfter, config, images, max_change, weights  # noqa: F401 (fixture)
from tests.tiny import tiny_bundle

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread in this module

SETTINGS = dict(base_model="m", identifier="zwx", class_noun="dog", output="o.safetensors", optimizer="adafactor",
                learning_rate=1e-3, adam_weight_decay=0.1, max_grad_norm=0.0)


def adafactor_by_hand(weight: torch.Tensor, grads: list[torch.Tensor], lr: float, weight_decay: float) -> torch.Tensor:
    """Shazeer & Stern (2018), Algorithm 4 with beta1 = 0 and transformers' choices: decay 1 - t^-0.8, eps1 1e-30,
    update clipping at RMS 1, a fixed step size (no relative step, no scaling by the weight's RMS), decoupled weight
    decay; a matrix's (or a conv kernel's last two dims') second moment kept as row and column means."""
    weight = weight.clone().double()
    row = col = None
    for t, grad in enumerate(grads, start=1):
        grad = grad.double()
        beta2 = 1 - t ** -0.8
        square = grad ** 2 + 1e-30
        row = (1 - beta2) * square.mean(-1) if row is None else beta2 * row + (1 - beta2) * square.mean(-1)
        col = (1 - beta2) * square.mean(-2) if col is None else beta2 * col + (1 - beta2) * square.mean(-2)
        estimate = (row / row.mean(-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)  # V = R C / mean(R)
        update = grad / estimate.sqrt()
        update = update / max(1.0, update.pow(2).mean().sqrt().item())
        weight = weight - weight_decay * lr * weight - lr * update
    return weight


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3)])
def test_the_update_is_the_papers_factored_one_at_the_runs_learning_rate(shape):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(shape))
    start = param.detach().clone()
    grads = [torch.randn(shape) for _ in range(4)]
    optimizer = make_optimizer(TrainConfig(**SETTINGS), [param], torch.device("cpu"))
    assert isinstance(optimizer, Adafactor)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    state = optimizer.state[param]
    assert "exp_avg" not in state  # no first moment: only the factored second moment is kept
    assert state["exp_avg_sq_row"].shape == shape[:-1] and state["exp_avg_sq_col"].shape == shape[:-2] + shape[-1:]
    expected = adafactor_by_hand(start, grads, lr=1e-3, weight_decay=0.1)
    assert torch.allclose(param.detach().double(), expected, rtol=0, atol=1e-6)
    assert (param.detach() - start).abs().max() > 1e-4  # it moved, by about the learning rate


def test_a_vector_keeps_an_unfactored_second_moment():
    param = torch.nn.Parameter(torch.ones(5))
    optimizer = make_optimizer(TrainConfig(**SETTINGS), [param], torch.device("cpu"))
    param.grad = torch.full((5,), 2.0)
    optimizer.step()
    # first step: beta2 = 0, v = g^2, update g / |g| = 1 (RMS 1, not clipped), decay 0.1 * lr
    assert torch.allclose(param.detach(), torch.full((5,), 1 - 1e-4 - 1e-3))
    assert set(optimizer.state[param]) == {"step", "exp_avg_sq", "RMS"}


def test_fused_adafactor_learns_exactly_what_the_ordinary_step_learns(images, tmp_path):
    settings = dict(optimizer="adafactor", train_text_encoder=True, max_grad_norm=0.0, batch_size=2,
                    lr_scheduler="cosine", lr_warmup_steps=1, max_train_steps=3, learning_rate=1e-3)
    runs = []
    for fused in (False, True):
        bundle = tiny_bundle("sd1")
        before = weights(bundle.unet)
        train(config(images, tmp_path / str(fused), fused_backward=fused, **settings), bundle=bundle)
        assert max_change(before, bundle.unet) > 1e-4
        runs.append(bundle)
    assert same_weights(*runs)


def test_a_cancelled_adafactor_run_resumes_to_the_same_weights(images, tmp_path):
    settings = dict(optimizer="adafactor", fused_backward=True, max_train_steps=4, checkpoint_every=2,
                    lr_scheduler="linear", max_grad_norm=1.0)
    straight = tiny_bundle("sd1")
    train(config(images, tmp_path / "straight", **settings), bundle=straight)
    cfg = config(images, tmp_path / "resumed", **settings)
    with pytest.raises(TrainingCancelled):
        train(cfg, bundle=tiny_bundle("sd1"), callbacks=StopAfter(3))
    resumed = tiny_bundle("sd1")
    assert train(cfg, bundle=resumed).resumed_from == 3
    assert same_weights(straight, resumed, names=("unet",))


def test_bf16_weights_step_adafactor_in_fp32_and_round_stochastically(images, tmp_path):
    bundle = tiny_bundle("sd1")
    made = []
    import trainer.loop
    original = trainer.loop.make_optimizer
    trainer.loop.make_optimizer = lambda *args: made.append(original(*args)) or made[-1]
    try:
        before = weights(bundle.unet)
        train(config(images, tmp_path, optimizer="adafactor", fused_backward=True, bf16_weights=True,
                     mixed_precision="bf16", max_train_steps=2, learning_rate=1e-3), bundle=bundle)
    finally:
        trainer.loop.make_optimizer = original
    optimizer = made[0]
    assert isinstance(optimizer, FusedBackward) and isinstance(optimizer.optimizers[0], Adafactor)
    assert all(p.dtype == torch.float32 for opt in optimizer.optimizers for p in opt.param_groups[0]["params"])
    assert next(bundle.unet.parameters()).dtype == torch.bfloat16  # the weights themselves stayed bf16
    assert max_change(before, bundle.unet) > 1e-4 and math.isfinite(max_change(before, bundle.unet))
