"""The DreamBooth objective with class-specific prior preservation (Ruiz et al. 2023, eq. 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the denoiser is trained to output: the noise (epsilon) or the velocity (v-prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_weight: float):
    """Mean squared error on the instance half plus lambda times that on the class-prior half.

    The batch holds the instance examples first, then (with prior preservation) as many class examples.
    Returns (total, instance_loss, prior_loss); prior_loss is 0 without class examples.
    """
    pred, target = pred.float(), target.float()
    instance = F.mse_loss(pred[:n_instance], target[:n_instance])
    if pred.shape[0] == n_instance:
        return instance, instance, torch.zeros_like(instance)
    prior = F.mse_loss(pred[n_instance:], target[n_instance:])
    return instance + prior_weight * prior, instance, prior
