"""Rectified flow's reflow (Liu et al. 2022, Alg. 3; thesis §1.2), then distillation to 1, 2 and 4 steps.

1. pairs: (z, x = ODE_teacher(z)) with the teacher at its default steps and CFG scale.
2. reflow: train the 2-rectified flow on straight lines between the pairs, v = z − x at t ~ logit-normal;
   coupled pairs make the paths straighter, so few Euler steps follow them.
3. distil: the same loss at the times of the 1-, 2- and 4-step Euler grids only, so the student is exact
   where it is sampled (the k-step "distill" stage of the paper, trained on the teacher's pairs).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.models.flow import interpolate, logit_normal_t, timesteps
from fewstep.models.pipeline import TextToImage
from fewstep.training.distill.common import (
    DistillRecipe,
    build_student,
    export_student,
    load_exported,
    teacher_guidance,
    velocity,
)
from fewstep.training.distill.config import DistillConfig
from fewstep.training.distill.teacher_data import TeacherSamples, teacher_samples
from fewstep.training.loop import train

# t ~ logit-normal(0, 1) in the reflow phase, as the teacher was trained (SD3, minRF)
TIME_LOGIT_MEAN, TIME_LOGIT_STD = 0.0, 1.0


class ReflowLoss(nn.Module):
    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, z, x, t, cond):
        x_t = interpolate(x, z, t)
        v = velocity(self.student, x_t, t, cond)
        return (v.float() - (z - x).float()).pow(2).mean(), {}


class ReflowPhase(DistillRecipe):
    def __init__(
        self,
        cfg: DistillConfig,
        teacher: TextToImage,
        pairs: TeacherSamples,
        student: nn.Module,
        grid_times: list[float] | None,
        steps_out: list[int],
    ):
        super().__init__(cfg, teacher)
        self.pairs = pairs
        self.grid_times = grid_times  # None: logit-normal t (reflow); else sample from these times (distil)
        self.steps_out = steps_out
        self.module = ReflowLoss(student)

    def make_batch(self, generator: torch.Generator) -> dict[str, Any]:
        b = self.cfg.batch_size
        batch = self.pairs.draw(b, generator)
        if self.grid_times is None:
            batch["t"] = logit_normal_t(b, generator, TIME_LOGIT_MEAN, TIME_LOGIT_STD)
        else:
            times = torch.tensor(self.grid_times)
            batch["t"] = times[torch.randint(0, len(times), (b,), generator=generator)]
        return batch

    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]):
        phase = "reflow" if self.grid_times is None else "distill"
        return export_student(
            self.teacher,
            ema.student,
            out_dir,
            self.cfg,
            info,
            self.steps_out,
            extra={"pairs": len(self.pairs), "phase": phase},
        )


def run_reflow(cfg: DistillConfig, out: Path, teacher: TextToImage) -> list[Path]:
    s = cfg.reflow
    n_pairs = min(s.pairs, cfg.max_steps * cfg.batch_size)  # --max-steps bounds the data generated too
    pair_steps = s.pair_steps or teacher.sampling.default_steps
    pairs = teacher_samples(
        teacher, n_pairs, pair_steps, teacher_guidance(cfg, teacher), out / "teacher-data", data=cfg.data, seed=cfg.seed
    )
    reflow_steps = max(1, int(cfg.max_steps * s.reflow_fraction))
    distill_steps = max(1, cfg.max_steps - reflow_steps)
    # 1) the 2-rectified flow: still a flow, sampled with Euler at any of the listed step counts
    flow_cfg = replace(cfg, max_steps=reflow_steps, name=f"{cfg.name}-2rf")
    phase1 = ReflowPhase(flow_cfg, teacher, pairs, build_student(teacher), None, [1, 2, 4, 8])
    train(flow_cfg, phase1, out_dir=out / "reflow")
    # 2) distil the reflowed flow to the grids of the step counts it will serve
    steps = sorted(s.student_steps)
    times = sorted({t for k in steps for t in timesteps(k)[:-1]}, reverse=True)
    reflowed = load_exported(teacher, out / "reflow" / "export").float().train().requires_grad_(True)
    dist_cfg = replace(cfg, max_steps=distill_steps)
    phase2 = ReflowPhase(dist_cfg, teacher, pairs, reflowed, times, steps)
    train(dist_cfg, phase2, out_dir=out / "distill")
    return [out / "reflow" / "export", out / "distill" / "export"]
