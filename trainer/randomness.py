"""Every random draw the training loop makes, from one seeded generator.

Keeping them behind one object makes runs repeatable, lets a resumed run continue the exact same stream (its state
is saved with the training state), and lets a test replay the draws another implementation made.
"""
from __future__ import annotations

import torch


class StepRandomness:
    """Draws in the order the loop asks: per epoch an order, per step posterior noise, noise, timesteps."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def epoch_order(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.generator).tolist()

    def latent_noise(self, shape: torch.Size) -> torch.Tensor:
        """Standard normal noise that samples the VAE posterior: latents = mean + std * this."""
        return torch.randn(shape, generator=self.generator)

    def noise(self, shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)

    def timesteps(self, n: int, num_train_timesteps: int) -> torch.Tensor:
        return torch.randint(0, num_train_timesteps, (n,), generator=self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
