"""Rectified flow (Liu et al. 2022; thesis §1.2): x_t = (1 − t)·x0 + t·ε, the network predicts v = ε − x0.

t = 0 is data, t = 1 pure noise; sampling integrates dx/dt = v from t = 1 down to 0.
"""

from __future__ import annotations

import torch


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε, with t (B,) broadcast over the sample dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean-sample estimate on the straight line: x0 = x_t − t·v."""
    return x_t - t.view(-1, *([1] * (x_t.dim() - 1))) * v


def logit_normal_t(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t = sigmoid(N(mean, std²)): the middle of the path, where the flow is hardest, gets most samples (SD3)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Flux's resolution shift: t' = s·t / (1 + (s − 1)·t); s > 1 spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def timesteps(steps: int, schedule: str = "uniform", shift: float = 1.0) -> list[float]:
    """A grid of steps + 1 times from 1 down to 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if schedule == "shifted":
        grid = shift_time(grid, shift)
    elif schedule != "uniform":
        raise ValueError(f"unknown schedule {schedule!r} (uniform or shifted)")
    return [float(x) for x in grid]
