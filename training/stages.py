"""Registry of training stages: ``fewstep train`` looks the config's ``stage`` up here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fewstep.errors import UsageError
from fewstep.training.config import TrainConfig


def _autoencoder(cfg: TrainConfig) -> Any:
    from fewstep.training.autoencoder import AutoencoderRecipe

    return AutoencoderRecipe(cfg)


def _teacher(cfg: TrainConfig) -> Any:
    from fewstep.training.teacher import TeacherRecipe

    return TeacherRecipe(cfg)


def _classifier(cfg: TrainConfig) -> Any:
    from fewstep.training.classifier import ClassifierRecipe

    return ClassifierRecipe(cfg)


STAGES: dict[str, Callable[[TrainConfig], Any]] = {
    "autoencoder": _autoencoder,
    "teacher": _teacher,
    "classifier": _classifier,
}


def make_recipe(cfg: TrainConfig) -> Any:
    """Build the stage's recipe; weights are initialised from ``cfg.seed`` so every DDP rank and every rerun
    starts from the same point."""
    if cfg.stage not in STAGES:
        raise UsageError(f"unknown stage {cfg.stage!r}; known: {sorted(STAGES)}")
    torch.manual_seed(cfg.seed)
    return STAGES[cfg.stage](cfg)
