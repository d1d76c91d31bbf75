"""The benchmark's judge: a small CNN that reads digit, foreground color and background color.

It is trained on rendered MNIST (train split) with light augmentation, so that it also reads the slightly
soft images that generators produce. Its 128-d penultimate features define the Fréchet distance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.models.checkpoint import load_module, save_checkpoint
from fewstep.training.config import TrainConfig
from fewstep.training.data import load_data, sample_batch
from fewstep.training.recipe import RecipeBase

CLASSIFIER = "classifier.safetensors"


class DigitClassifier(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1),
            nn.SiLU(),  # 16×16
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
            nn.SiLU(),  # 8×8
            nn.Flatten(),
            nn.Linear(2 * w * 64, feature_dim),
            nn.SiLU(),
        )
        self.digit = nn.Linear(feature_dim, 10)
        self.fg = nn.Linear(feature_dim, 10)
        self.bg = nn.Linear(feature_dim, 10)
        self.config = {"width": width, "feature_dim": feature_dim}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [-1, 1] -> (B, feature_dim)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {"digit": self.digit(f), "fg": self.fg(f), "bg": self.bg(f), "features": f}


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift by up to 2 px, blur a little sometimes and add noise: robustness to generated images."""
    b = images.shape[0]
    dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
    out = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    blur = torch.rand(b, 1, 1, 1, generator=generator) < 0.3
    soft = F.avg_pool2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    out = torch.where(blur, soft, out)
    return out + 0.05 * torch.randn(out.shape, generator=generator)


class ClassifierLoss(nn.Module):
    def __init__(self, net: DigitClassifier):
        super().__init__()
        self.net = net

    def forward(self, images, digits, fg, bg):
        out = self.net(images)
        losses = {k: F.cross_entropy(out[k], y) for k, y in (("digit", digits), ("fg", fg), ("bg", bg))}
        return sum(losses.values()), {f"ce_{k}": v.detach() for k, v in losses.items()}


class ClassifierRecipe(RecipeBase):
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.data = load_data(cfg.data, "train")
        self.module = ClassifierLoss(DigitClassifier())

    def make_batch(self, generator: torch.Generator) -> dict[str, Any]:
        b = sample_batch(self.data, self.cfg.batch_size, generator)
        return {"images": augment(b.images, generator), "digits": b.digits, "fg": b.fg, "bg": b.bg}

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]) -> DigitClassifier:
        net = ema.net.cpu().eval()
        acc = accuracy_on_real(net, self.cfg.data)
        card = {
            "name": self.cfg.name,
            "role": "classifier",
            "model": net.config,
            "training": {"method": "supervised", **info},
            "data": {"name": self.cfg.data, "split": "train"},
            "metrics": {f"test_{k}_accuracy": round(v, 4) for k, v in acc.items()},
        }
        save_checkpoint(out_dir, card, {CLASSIFIER: net}, dtype="float32", overwrite=True)
        print(f"classifier exported to {out_dir}: test accuracy {acc}")
        return net


@torch.no_grad()
def accuracy_on_real(net: DigitClassifier, data: str = "digits", n: int = 2000) -> dict[str, float]:
    test = load_data(data, "test")
    b = sample_batch(test, min(n, len(test)), torch.Generator().manual_seed(7))
    out = net(b.images)
    labels = {"digit": b.digits, "fg": b.fg, "bg": b.bg}
    return {k: float((out[k].argmax(-1) == y).float().mean()) for k, y in labels.items()}


def load_classifier(directory: str | Path) -> DigitClassifier:
    return load_module(directory, "classifier", DigitClassifier, CLASSIFIER)[0]
