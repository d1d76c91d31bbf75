"""Registry of distillation methods: ``fewstep distill --method NAME`` looks NAME up here.

Each entry runs the method end to end and returns the exported student checkpoint directories.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fewstep.training.distill.config import DistillConfig
from fewstep.training.loop import train


def _single(recipe_cls) -> Callable[[DistillConfig, Path], list[Path]]:
    def run(cfg: DistillConfig, out: Path) -> list[Path]:
        train(cfg, recipe_cls(cfg), out_dir=out)
        return [out / "export"]

    return run


def _consistency(cfg: DistillConfig, out: Path) -> list[Path]:
    from fewstep.training.distill.consistency import ConsistencyRecipe

    return _single(ConsistencyRecipe)(cfg, out)


def _progressive(cfg: DistillConfig, out: Path) -> list[Path]:
    from fewstep.training.distill.progressive import run_progressive

    return run_progressive(cfg, out)


def _reflow(cfg: DistillConfig, out: Path) -> list[Path]:
    from fewstep.training.distill.reflow import run_reflow

    return run_reflow(cfg, out)


def _dmd2(cfg: DistillConfig, out: Path) -> list[Path]:
    from fewstep.training.distill.dmd2 import DMD2Recipe

    return _single(DMD2Recipe)(cfg, out)


def _ladd(cfg: DistillConfig, out: Path) -> list[Path]:
    from fewstep.training.distill.ladd import LADDRecipe

    return _single(LADDRecipe)(cfg, out)


METHODS: dict[str, Callable[[DistillConfig, Path], list[Path]]] = {
    "progressive": _progressive,
    "consistency": _consistency,
    "reflow": _reflow,
    "dmd2": _dmd2,
    "ladd": _ladd,
}


def distill(cfg: DistillConfig) -> list[Path]:
    """Run ``cfg.method`` into ``cfg.out``; returns the student checkpoint directories it exported."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; known: {sorted(METHODS)}")
    torch.manual_seed(cfg.seed)
    return METHODS[cfg.method](cfg, Path(cfg.out))
