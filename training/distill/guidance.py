"""Guidance distillation, stage 1 (Meng et al. 2023, "On distillation of guided diffusion models", §3.1).

Classifier-free guidance costs two forwards per step: v_u + w·(v_c − v_u). A student with a guidance embedding
(the teacher's copy plus a zero-initialised w-embedding, so it starts as the teacher's conditional branch)
learns that guided output in one forward, for every w in [guidance_min, guidance_max]:

    loss = ‖v_student(x_t, t, c, w) − [v_u + w·(v_c − v_u)]_teacher(x_t, t, c)‖²,   t ~ U(0, 1], w ~ U[min, max]

with x_t from the data. It samples like the teacher (same steps, same grid), a request's ``guidance`` is its
input (the server accepts it: the card's transformer has ``guidance_embed``), and stage 2 is progressive
distillation from it (`fewstep distill --method progressive --teacher GUIDANCE_STUDENT`): each round's student
keeps w as an input (training/distill/progressive.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.errors import UsageError
from fewstep.models.flow import interpolate
from fewstep.models.pipeline import TextToImage
from fewstep.training.distill.common import (
    DataSource,
    DistillRecipe,
    build_student,
    export_student,
    guided_velocity,
    teacher_guidance,
    velocity,
)
from fewstep.training.distill.config import DistillConfig


class GuidanceLoss(nn.Module):
    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x_t, t, cond, w, target):
        v = velocity(self.student, x_t, t, cond, guidance=w)
        return (v.float() - target.float()).pow(2).mean(), {}


class GuidanceRecipe(DistillRecipe):
    def __init__(self, cfg: DistillConfig, teacher: TextToImage):
        super().__init__(cfg, teacher)
        if teacher.transformer.cfg.guidance_embed:
            raise UsageError(f"{teacher.name} already takes the guidance scale as an input: nothing to distil")
        s = cfg.guidance
        if not 0 <= s.guidance_min <= s.guidance_max:
            raise UsageError(f"guidance range [{s.guidance_min}, {s.guidance_max}] is empty or negative")
        self.source = DataSource(cfg, teacher)
        self.module = GuidanceLoss(build_student(teacher, guidance_embed=True))

    def make_batch(self, generator: torch.Generator) -> dict[str, Any]:
        b, s = self.cfg.batch_size, self.cfg.guidance
        batch = self.source.draw(b, generator)
        batch["t"] = 1 - torch.rand(b, generator=generator)  # U(0, 1]: every time the sampler visits, t = 1 too
        batch["noise"] = torch.randn(b, *self.teacher.latent_shape, generator=generator)
        batch["w"] = s.guidance_min + (s.guidance_max - s.guidance_min) * torch.rand(b, generator=generator)
        return batch

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        x0, noise, t, cond, w = batch["x0"], batch["noise"], batch["t"], batch["cond"], batch["w"]
        x_t = interpolate(x0, noise, t)
        target = guided_velocity(self.teacher.transformer, x_t, t, cond, self.cond.empty(len(t)), w)
        return self.ctx.module(x_t, t, cond, w, target)  # the DDP-wrapped module: gradients averaged

    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]):
        s, steps = self.cfg.guidance, list(self.cfg.guidance.student_steps) or [self.teacher.sampling.default_steps]
        return export_student(
            self.teacher,
            ema.student,
            out_dir,
            self.cfg,
            info,
            steps,
            grids={n: self.teacher.grid(n) for n in steps},  # the teacher's own schedule
            guidance=teacher_guidance(self.cfg, self.teacher),  # the default w; a request may set another
            extra={"guidance_range": [s.guidance_min, s.guidance_max]},
        )
