"""Helpers the tests share (imported, never through conftest): tiny training configs and random weights."""

from __future__ import annotations

from pathlib import Path

import torch

from fewstep.training.config import TrainConfig, config_from
from fewstep.training.distill.config import DistillConfig
from fewstep.training.loop import train
from fewstep.training.stages import make_recipe


def tiny_config(tmp: Path, **changes) -> TrainConfig:
    base = dict(
        model="tiny",
        data="synthetic",
        batch_size=16,
        lr=3e-3,
        warmup_steps=2,
        max_steps=4,
        log_every=1,
        ckpt_every=1000,
        default_steps=4,
        guidance=2.0,
        export_dtype="float32",
        out=str(tmp),
    )
    base.update(changes)
    return TrainConfig(**base)


def run_stage(tmp: Path, **changes) -> Path:
    cfg = tiny_config(tmp, **changes)
    train(cfg, make_recipe(cfg), quiet=True)
    return tmp / "export"


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every weight a random value: a freshly built model has zero-initialised output layers, which
    would make sampling tests trivially pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


def tiny_distill(tmp_path, teacher, sets=(), **changes):
    """A tiny run's config, built as the CLI builds it: loop keys at the top, method keys in their section."""
    base = dict(
        teacher=str(teacher),
        data="synthetic",
        batch_size=4,
        max_steps=2,
        warmup_steps=1,
        log_every=1,
        out=str(tmp_path),
        name="tiny-student",
        export_dtype="float32",
        progressive={"start_steps": 4},
        consistency={"grid_steps": 4},
        reflow={"pairs": 8, "pair_steps": 2},
        dmd2={"fake_updates": 2},
        ladd={"samples": 8, "sample_steps": 2},
    )
    base.update(changes)
    return config_from(DistillConfig, base, sets)
