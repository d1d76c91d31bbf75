"""Registry of distillation methods: ``fewstep distill --method NAME`` looks NAME up here.

Each entry runs the method end to end on a loaded teacher and returns the exported student checkpoint
directories. Single-phase methods are one recipe through the loop; progressive (rounds) and reflow (phases)
chain several.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fewstep.errors import UsageError
from fewstep.kernels.runtime import resolve_device
from fewstep.models.pipeline import TextToImage
from fewstep.training.data import data_captions
from fewstep.training.distill.common import is_flux, load_teacher
from fewstep.training.distill.config import DistillConfig
from fewstep.training.distributed import rank
from fewstep.training.loop import train

Runner = Callable[[DistillConfig, Path, TextToImage], list[Path]]


def _single(recipe_cls) -> Runner:
    def run(cfg: DistillConfig, out: Path, teacher: TextToImage) -> list[Path]:
        train(cfg, recipe_cls(cfg, teacher), out_dir=out)
        return [out / "export"]

    return run


def _consistency(cfg: DistillConfig, out: Path, teacher: TextToImage) -> list[Path]:
    from fewstep.training.distill.consistency import ConsistencyRecipe

    return _single(ConsistencyRecipe)(cfg, out, teacher)


def _progressive(cfg: DistillConfig, out: Path, teacher: TextToImage) -> list[Path]:
    from fewstep.training.distill.progressive import run_progressive

    return run_progressive(cfg, out, teacher)


def _reflow(cfg: DistillConfig, out: Path, teacher: TextToImage) -> list[Path]:
    from fewstep.training.distill.reflow import run_reflow

    return run_reflow(cfg, out, teacher)


def _dmd2(cfg: DistillConfig, out: Path, teacher: TextToImage) -> list[Path]:
    from fewstep.training.distill.dmd2 import DMD2Recipe

    return _single(DMD2Recipe)(cfg, out, teacher)


def _ladd(cfg: DistillConfig, out: Path, teacher: TextToImage) -> list[Path]:
    from fewstep.training.distill.ladd import LADDRecipe

    return _single(LADDRecipe)(cfg, out, teacher)


def _guidance(cfg: DistillConfig, out: Path, teacher: TextToImage) -> list[Path]:
    from fewstep.training.distill.guidance import GuidanceRecipe

    return _single(GuidanceRecipe)(cfg, out, teacher)


def _compress(cfg: DistillConfig, out: Path, teacher: TextToImage) -> list[Path]:
    from fewstep.training.compress.recipe import run_compress

    return run_compress(cfg, out, teacher)


METHODS: dict[str, Runner] = {
    "progressive": _progressive,
    "consistency": _consistency,
    "reflow": _reflow,
    "dmd2": _dmd2,
    "ladd": _ladd,
    "guidance": _guidance,
    "compress": _compress,
}


def distill(cfg: DistillConfig, teacher: TextToImage | None = None) -> list[Path]:
    """Run ``cfg.method`` into ``cfg.out``; returns the student checkpoint directories it exported."""
    if cfg.method not in METHODS:
        raise UsageError(f"unknown method {cfg.method!r}; known: {sorted(METHODS)}")
    torch.manual_seed(cfg.seed)
    if teacher is None:
        teacher = load_teacher(cfg.teacher, resolve_device(cfg.device, rank()), cfg.resolution)
    if is_flux(teacher) and teacher.transformer.cfg.guidance_embed and cfg.teacher_guidance is not None:
        teacher.transformer.default_guidance = cfg.teacher_guidance  # the scale the recipe's targets are made at
    captions = data_captions(cfg.data) if is_flux(teacher) else None
    if captions is not None:  # every caption encoded once by CLIP + T5, kept in OUT (a resumed run reads them back)
        teacher.precompute(captions, Path(cfg.out))
    return METHODS[cfg.method](cfg, Path(cfg.out), teacher)
