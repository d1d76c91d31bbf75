"""Samplers as free functions (k-diffusion style): each takes a denoiser, the initial noise and a time grid.

``velocity_fn(x, t) -> v`` hides the network, the text condition and classifier-free guidance, so the same
sampler runs a teacher, a student or a guidance-embedded student.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> estimate of x0


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """One CPU generator per image: an image's noise depends on its seed alone, never on its batch."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device)


@torch.no_grad()
def sample_euler(velocity_fn: VelocityFn, noise: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """Euler on the flow ODE: x ← x + (t_next − t)·v(x, t), from grid[0] = 1 to grid[-1] = 0."""
    x = noise
    ones = torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        v = velocity_fn(x, ones * t)
        x = x + (t_next - t) * v
    return x


@torch.no_grad()
def sample_x0(
    denoise_fn: DenoiseFn, noise: torch.Tensor, grid: Sequence[float], seeds: Sequence[int] | None = None
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): predict x0, re-noise to the next time.

    The fresh noise of step k comes from each image's own seed, so results stay batch-independent.
    """
    x = noise
    ones = torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
    for k, (t, t_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        x0 = denoise_fn(x, ones * t)
        if t_next <= 0:
            return x0
        seeds_k = [hash_seed(s, k + 1) for s in seeds] if seeds is not None else range(x.shape[0])
        eps = seeded_noise(seeds_k, tuple(x.shape[1:]), x.device)
        x = (1 - t_next) * x0 + t_next * eps
    return x


def hash_seed(seed: int, k: int) -> int:
    """A distinct, reproducible seed for the k-th noise draw of an image."""
    return (int(seed) * 1_000_003 + k * 7919) % (2**63 - 1)


def velocity_denoiser(velocity_fn: VelocityFn) -> DenoiseFn:
    """x̂0 = x − t·v: the clean-sample estimate of a velocity network."""
    from fewstep.models.flow import x0_from_velocity

    return lambda x, t: x0_from_velocity(x, velocity_fn(x, t), t)
