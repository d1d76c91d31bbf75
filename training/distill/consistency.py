"""Consistency distillation on the flow ODE (Song et al. 2023, Alg. 2), with LCM's guidance distillation.

One step: x_t from data at grid time t_i; one teacher Euler step with CFG scale w to t_{i−1}; the target is
the EMA target network's f(x_{t_{i−1}}, t_{i−1}, w); the student's f(x_t, t, w) regresses it under a
pseudo-Huber loss. f(x, t) = c_skip(t)·x + c_out(t)·(x − t·v) satisfies f(x, 0) = x by construction, and with
LCM's c_out (→ 1 away from t = 0) it equals the teacher's x0 estimate at initialisation (models/flow.py).
The student takes w as an input embedding (LCM): one pass per step at any w, no CFG doubling at serving.
Sampling: multistep consistency sampling at 1, 2 and 4 steps.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.errors import UsageError
from fewstep.models.flow import CONSISTENCY_FORMS, consistency_function, interpolate
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
from fewstep.training.distill.losses import default_huber_c, pseudo_huber
from fewstep.training.loop import ema_update
from fewstep.training.recipe import Context


class ConsistencyRecipe(DistillRecipe):
    def __init__(self, cfg: DistillConfig, teacher: TextToImage):
        super().__init__(cfg, teacher)
        self.s = cfg.consistency
        if self.s.parameterization not in CONSISTENCY_FORMS:
            raise UsageError(
                f"consistency.parameterization must be one of {CONSISTENCY_FORMS}, not {self.s.parameterization!r}"
            )
        self.source = DataSource(cfg, teacher)
        self.module = build_student(teacher, guidance_embed=True)
        self.huber_c = self.s.huber_c or default_huber_c(math.prod(teacher.latent_shape))

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        if ctx.world > 1 and self.cfg.parallel == "fsdp":
            raise UsageError("consistency keeps a full EMA target network beside the student: use parallel: ddp")
        # θ⁻: the EMA target network, tracked (not optimised) and resumed with the run
        self.target = ctx.auxiliary("target", copy.deepcopy(self.module))

    def make_batch(self, generator: torch.Generator) -> dict[str, Any]:
        b, n = self.cfg.batch_size, self.s.grid_steps
        batch = self.source.draw(b, generator)
        i = torch.randint(1, n + 1, (b,), generator=generator)
        batch["t"] = i.float() / n
        batch["s"] = (i - 1).float() / n
        lo, hi = self.s.guidance_min, self.s.guidance_max
        batch["w"] = lo + (hi - lo) * torch.rand(b, generator=generator)
        batch["noise"] = torch.randn(b, *self.teacher.latent_shape, generator=generator)
        return batch

    def f(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond, w: torch.Tensor) -> torch.Tensor:
        v = velocity(net, x, t, cond, guidance=w)
        return consistency_function(x, v, t, self.s.sigma_data, self.s.boundary_scale, self.s.parameterization)

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        x0, noise, t, s, w, cond = (batch[k] for k in ("x0", "noise", "t", "s", "w", "cond"))
        ema_update(self.target.module, self.module, self.s.target_ema)  # θ⁻ ← μθ⁻ + (1 − μ)θ, after the last step
        x_t = interpolate(x0, noise, t)
        with torch.no_grad():
            v = guided_velocity(self.teacher.transformer, x_t, t, cond, self.cond.empty(len(t)), w)
            x_s = x_t + (s - t).view(-1, 1, 1, 1) * v  # one teacher Euler step t -> s
            target = self.f(self.target.module, x_s, s, cond, w)  # = x_s exactly where s = 0
        pred = self.f(self.ctx.module, x_t, t, cond, w)
        return pseudo_huber(pred.float() - target.float(), self.huber_c), {}

    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]):
        return export_student(
            self.teacher,
            ema,
            out_dir,
            self.cfg,
            info,
            list(self.s.student_steps),
            sampler="x0",
            parameterization=self.s.parameterization,
            guidance=teacher_guidance(self.cfg, self.teacher),
            extra={"huber_c": self.huber_c},
            consistency=(self.s.sigma_data, self.s.boundary_scale),
        )
