"""The distillation losses as plain functions of tensors, so that each can be checked by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pseudo_huber(diff: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample sqrt(‖d‖² + c²) − c, averaged over the batch (Song & Dhariwal 2023, iCT)."""
    return (diff.flatten(1).pow(2).sum(1) + c * c).sqrt().sub(c).mean()


def default_huber_c(dim: int) -> float:
    """iCT's choice: c = 0.00054·sqrt(d) for d-dimensional samples."""
    return 0.00054 * dim**0.5


def progressive_velocity_target(
    x_t: torch.Tensor, x_target: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor
) -> torch.Tensor:
    """The velocity that takes x_t to the teacher's two-step result x_target in ONE Euler step
    (Salimans & Ho 2022, Alg. 2, written for the flow ODE): x_t + (t_next − t)·v = x_target."""
    shape = (-1, *([1] * (x_t.dim() - 1)))
    return (x_t - x_target) / (t - t_next).view(shape)


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's distribution-matching direction (Yin et al. 2024, eq. 7; DMD2 code):
    p_real = x − x0_real, p_fake = x − x0_fake, grad = (p_real − p_fake) / mean|p_real| per sample."""
    p_real, p_fake = x - x0_real, x - x0_fake
    norm = p_real.abs().flatten(1).mean(1).clamp(min=1e-6).view(-1, *([1] * (x.dim() - 1)))
    return (p_real - p_fake) / norm


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5·‖x − sg(x − grad)‖² (mean): its gradient with respect to x is grad / numel."""
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def hinge_discriminator(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge on every logit. Logits (B, heads, tokens): each head's per-token hinges averaged over the batch and
    tokens, summed over heads (ADD eq. 3, StyleGAN-T): no head clears its margin on a sum or a token mean."""
    return _per_head(F.relu(1 - real_logits)) + _per_head(F.relu(1 + fake_logits))


def hinge_generator(fake_logits: torch.Tensor) -> torch.Tensor:
    return -_per_head(fake_logits)


def add_distillation(x0: torch.Tensor, x0_teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ADD's distillation term (Sauer et al. 2023, eq. 5): c(t)·‖x̂_θ − sg(x̂_ψ)‖², the teacher's denoised estimate
    of the re-noised student sample as a regression target; per sample the mean squared error times its weight
    (B,), averaged over the batch."""
    err = (x0 - x0_teacher.detach()).pow(2).flatten(1).mean(1)
    return (weight * err).mean()


def _per_head(values: torch.Tensor) -> torch.Tensor:
    """(B,) -> mean; (B, heads, tokens) -> mean over batch and tokens, summed over heads."""
    if values.dim() == 1:
        return values.mean()
    return values.mean(dim=(0, 2)).sum()


def gan_discriminator(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss for DMD2's classifier head."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def gan_generator(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()
