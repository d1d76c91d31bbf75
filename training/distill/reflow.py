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
    Conditioner,
    build_student,
    export_student,
    load_teacher,
    prepare_common,
    velocity,
)
from fewstep.training.distill.common import teacher_guidance as guidance_of
from fewstep.training.distill.config import DistillConfig
from fewstep.training.distill.teacher_data import draw, generate_pairs
from fewstep.training.loop import train


class ReflowLoss(nn.Module):
    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, z, x, t, cond):
        x_t = interpolate(x, z, t)
        v = velocity(self.student, x_t, t, cond)
        return (v.float() - (z - x).float()).pow(2).mean(), {}


class ReflowPhase:
    def __init__(self, cfg: DistillConfig, teacher: TextToImage, pairs: dict, student: nn.Module,
                 grid_times: list[float] | None, steps_out: list[int]):
        self.cfg, self.teacher, self.pairs = cfg, teacher, pairs
        self.cond = Conditioner(teacher)
        self.grid_times = grid_times  # None: logit-normal t (reflow); else sample from these times (distil)
        self.steps_out = steps_out
        self.module = ReflowLoss(student)

    def make_batch(self, step: int, generator: torch.Generator) -> dict[str, Any]:
        b = self.cfg.batch_size
        batch = draw(self.pairs, b, generator)
        if self.grid_times is None:
            batch["t"] = logit_normal_t(b, generator, self.cfg.t_logit_mean, self.cfg.t_logit_std)
        else:
            times = torch.tensor(self.grid_times)
            batch["t"] = times[torch.randint(0, len(times), (b,), generator=generator)]
        return batch

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        self.teacher.to(device)
        return prepare_common(batch, device, self.cond, None)

    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]):
        return export_student(self.teacher, ema.student, out_dir, self.cfg, info, self.steps_out,
                              extra={"pairs": len(self.pairs["captions"]),
                                     "phase": "reflow" if self.grid_times is None else "distill"})


def run_reflow(cfg: DistillConfig, out: Path, teacher: TextToImage | None = None) -> list[Path]:
    teacher = teacher or load_teacher(cfg.teacher)
    n_pairs = min(cfg.pairs, cfg.max_steps * cfg.batch_size)  # --max-steps bounds the data generated too
    pair_steps = cfg.pair_steps or teacher.sampling.default_steps
    pairs = generate_pairs(teacher, n_pairs, pair_steps, guidance_of(cfg, teacher), out / "pairs.pt",
                           data=cfg.data, seed=cfg.seed)
    reflow_steps = max(1, int(cfg.max_steps * cfg.reflow_fraction))
    distill_steps = max(1, cfg.max_steps - reflow_steps)
    # 1) the 2-rectified flow: still a flow, sampled with Euler at any of the listed step counts
    flow_cfg = replace(cfg, max_steps=reflow_steps, name=f"{cfg.name}-2rf")
    phase1 = ReflowPhase(flow_cfg, teacher, pairs, build_student(teacher), None, [1, 2, 4, 8])
    train(flow_cfg, phase1, out_dir=out / "reflow")
    # 2) distil the reflowed flow to the grids of the step counts it will serve
    steps = sorted(cfg.student_step_set)
    times = sorted({t for s in steps for t in timesteps(s)[:-1]}, reverse=True)
    reflowed = TextToImage.load(out / "reflow" / "export").transformer.train().requires_grad_(True)
    dist_cfg = replace(cfg, max_steps=distill_steps)
    phase2 = ReflowPhase(dist_cfg, teacher, pairs, reflowed, times, steps)
    train(dist_cfg, phase2, out_dir=out / "distill")
    return [out / "reflow" / "export", out / "distill" / "export"]
