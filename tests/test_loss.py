"""The loss against the paper's formula, computed independently element by element."""
import numpy as np
import torch
from diffusers import DDPMScheduler

from trainer.loss import dreambooth_loss, prediction_target


def formula(pred, target, n_instance, lam):
    """Eq. 2 of Ruiz et al.: mean squared error on the subject batch + lambda * the same on the prior batch."""
    p, t = pred.numpy().astype(np.float64), target.numpy().astype(np.float64)
    inst = sum(((p[i] - t[i]) ** 2).sum() for i in range(n_instance)) / p[:n_instance].size
    prior = sum(((p[i] - t[i]) ** 2).sum() for i in range(n_instance, len(p))) / p[n_instance:].size
    return inst + lam * prior, inst, prior


def test_loss_matches_formula_with_prior_weight():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    for lam in (0.0, 1.0, 0.3):
        total, inst, prior = dreambooth_loss(pred, target, 2, lam)
        want_total, want_inst, want_prior = formula(pred, target, 2, lam)
        assert abs(total.item() - want_total) < 1e-5
        assert abs(inst.item() - want_inst) < 1e-5
        assert abs(prior.item() - want_prior) < 1e-5


def test_prior_term_only_sees_class_half():
    pred = torch.zeros(2, 4, 4, 4)
    target = torch.zeros(2, 4, 4, 4)
    target[1] = 2.0  # only the class example is wrong
    total, inst, prior = dreambooth_loss(pred, target, 1, 0.5)
    assert inst.item() == 0.0 and prior.item() == 4.0 and total.item() == 2.0


def test_without_prior_preservation_the_loss_is_plain_mse():
    pred, target = torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    total, inst, prior = dreambooth_loss(pred, target, 2, 1.0)
    assert total.item() == 1.0 and prior.item() == 0.0


def test_targets_follow_the_prediction_type():
    latents, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([10, 500, 990])
    eps = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(prediction_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      prediction_type="v_prediction")
    abar = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = abar.sqrt() * noise - (1 - abar).sqrt() * latents  # v = alpha_t * eps - sigma_t * x0
    torch.testing.assert_close(prediction_target(v, latents, noise, t), want)
