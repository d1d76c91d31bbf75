"""Shared fixtures: tiny models trained for a few steps on synthetic digits (no download, seconds)."""

from __future__ import annotations

import os

# The kernel tests run Triton on CPU tensors through its interpreter, which must be switched on before Triton
# is first imported; it changes nothing for tests that never launch a Triton kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fewstep.training.config import TrainConfig
from fewstep.training.loop import train
from fewstep.training.stages import make_recipe


def tiny_config(tmp: Path, **changes) -> TrainConfig:
    base = dict(model="tiny", data="synthetic", batch_size=16, lr=3e-3, warmup_steps=2, max_steps=4,
                log_every=1, ckpt_every=1000, default_steps=4, guidance=2.0, export_dtype="float32",
                out=str(tmp))
    base.update(changes)
    return TrainConfig(**base)


def run_stage(tmp: Path, **changes) -> Path:
    cfg = tiny_config(tmp, **changes)
    train(cfg, make_recipe(cfg), quiet=True)
    return tmp / "export"


@pytest.fixture(scope="session")
def tiny_ae(tmp_path_factory) -> Path:
    return run_stage(tmp_path_factory.mktemp("ae"), stage="autoencoder", name="tiny-ae", max_steps=3)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_ae) -> Path:
    return run_stage(tmp_path_factory.mktemp("teacher"), stage="teacher", name="tiny-teacher",
                     autoencoder=str(tiny_ae), max_steps=3)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return run_stage(tmp_path_factory.mktemp("clf"), stage="classifier", name="tiny-classifier", max_steps=3)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every weight a random value: a freshly built model has zero-initialised output layers, which
    would make sampling tests trivially pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
