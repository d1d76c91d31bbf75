"""The quality gate's critic: scores a student's image for its prompt (what serving and training/gate.py share).

Trained by ``fewstep train-gate`` (training/gate.py); the server loads it for a student whose card names it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fewstep.models.checkpoint import Card, load_module

CRITIC = "critic.safetensors"


class Critic(nn.Module):
    """score(image, text) -> logit that the image is right for its prompt. A small CNN over the image, the
    prompt's pooled text embedding projected to the same width, and an MLP over both and their product."""

    def __init__(self, text_dim: int, width: int = 32, feature_dim: int = 128, image_size: int = 32):
        super().__init__()
        w = width
        self.image = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim), nn.SiLU(),
        )  # fmt: skip
        self.text = nn.Linear(text_dim, feature_dim)
        self.head = nn.Sequential(nn.Linear(3 * feature_dim, feature_dim), nn.SiLU(), nn.Linear(feature_dim, 1))
        self.config = {"text_dim": text_dim, "width": width, "feature_dim": feature_dim, "image_size": image_size}

    def forward(self, images: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], (B, text_dim) -> (B,) logits."""
        f, t = self.image(images), self.text(pooled.float())
        return self.head(torch.cat([f, t, f * t], dim=-1)).squeeze(-1)

    @torch.no_grad()
    def score(self, images: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(B,) in [0, 1]: the critic's probability that each image is right."""
        return torch.sigmoid(self(images.float(), pooled))


def load_critic(directory: str | Path) -> tuple[Critic, Card]:
    """The critic and its card (whose sha256 of the weights a student's gate names)."""
    return load_module(directory, "gate", Critic, CRITIC)
