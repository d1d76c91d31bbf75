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


# How f(x, t) scales the network's x0 estimate (a card's ``parameterization``):
#   "consistency-lcm": c_out = s / sqrt(s² + σd²) -> 1, as LCM writes it for a network that supplies an x0 estimate
#                      (Luo et al. 2023): f = x̂0 = the teacher's own estimate at initialisation.
#   "consistency":     c_out = σd·s / sqrt(s² + σd²) -> σd, EDM's scaling of a *raw* network output (Song et al.
#                      2023, App. C). Applied to a full-scale x̂0 it starts the student at half scale; kept so that
#                      students trained with it (zoo/digits-consistency) sample exactly as before.
CONSISTENCY_FORMS = ("consistency-lcm", "consistency")


def consistency_coefficients(
    t: torch.Tensor, sigma_data: float = 0.5, scale: float = 1000.0, form: str = "consistency-lcm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip, c_out of the consistency boundary parameterisation, s = scale·t: c_skip = σd² / (s² + σd²) and
    c_out as ``form`` says (above). At t = 0, c_skip = 1 and c_out = 0, so f(x, 0) = x exactly."""
    if form not in CONSISTENCY_FORMS:
        raise ValueError(f"unknown consistency parameterisation {form!r}; known: {CONSISTENCY_FORMS}")
    s = scale * t
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / torch.sqrt(s**2 + sigma_data**2)
    if form == "consistency":
        c_out = sigma_data * c_out
    return c_skip, c_out


def consistency_function(
    x_t: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    sigma_data: float = 0.5,
    scale: float = 1000.0,
    form: str = "consistency-lcm",
) -> torch.Tensor:
    """f(x, t) = c_skip(t)·x + c_out(t)·x̂0(x, t), with x̂0 = x − t·v from the velocity network."""
    c_skip, c_out = consistency_coefficients(t, sigma_data, scale, form)
    shape = (-1, *([1] * (x_t.dim() - 1)))
    return c_skip.view(shape) * x_t + c_out.view(shape) * x0_from_velocity(x_t, v, t)
