"""Consistency distillation on the flow ODE (Song et al. 2023, Alg. 2), with LCM's guidance distillation.

One step: x_t from data at grid time t_i; one teacher Euler step with CFG scale w to t_{i−1}; the target is
the EMA target network's f(x_{t_{i−1}}, t_{i−1}, w); the student's f(x_t, t, w) regresses it under a
pseudo-Huber loss. f(x, t) = c_skip(t)·x + c_out(t)·(x − t·v) satisfies f(x, 0) = x by construction.
The student takes w as an input embedding (LCM): one pass per step at any w, no CFG doubling at serving.
Sampling: multistep consistency sampling at 1, 2 and 4 steps.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.models.flow import consistency_function, interpolate
from fewstep.training.distill.common import (
    Conditioner,
    DataSource,
    build_student,
    export_student,
    guided_velocity,
    load_teacher,
    prepare_common,
    teacher_guidance,
    velocity,
)
from fewstep.training.distill.config import DistillConfig
from fewstep.training.distill.losses import default_huber_c, pseudo_huber
from fewstep.training.loop import ema_update


class ConsistencyRecipe:
    def __init__(self, cfg: DistillConfig, teacher=None):
        self.cfg = cfg
        self.teacher = teacher or load_teacher(cfg.teacher)
        self.cond = Conditioner(self.teacher)
        self.source = DataSource(cfg, self.teacher)
        self.module = build_student(self.teacher, guidance_embed=True)
        self.target = copy.deepcopy(self.module).requires_grad_(False).eval()
        dim = 1
        for s in self.teacher.latent_shape:
            dim *= s
        self.huber_c = cfg.huber_c or default_huber_c(dim)

    def make_batch(self, step: int, generator: torch.Generator) -> dict[str, Any]:
        b = self.cfg.batch_size
        batch = self.source.draw(b, generator)
        i = torch.randint(1, self.cfg.grid_steps + 1, (b,), generator=generator)
        batch["t"] = i.float() / self.cfg.grid_steps
        batch["s"] = (i - 1).float() / self.cfg.grid_steps
        lo, hi = self.cfg.guidance_min, self.cfg.guidance_max
        batch["w"] = lo + (hi - lo) * torch.rand(b, generator=generator)
        batch["noise"] = torch.randn(b, *self.teacher.latent_shape, generator=generator)
        return batch

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        return prepare_common(batch, device, self.cond, self.source)

    def setup(self, device: torch.device, wrap, student: nn.Module) -> None:
        self.student = student
        self.target.to(device)
        self.teacher.to(device)

    def f(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond, w: torch.Tensor) -> torch.Tensor:
        return consistency_function(x, velocity(net, x, t, cond, guidance=w), t, self.cfg.sigma_data,
                                    self.cfg.boundary_scale)

    def train_step(self, batch: dict[str, Any], lr: float):
        x0, noise, t, s, w, cond = (batch[k] for k in ("x0", "noise", "t", "s", "w", "cond"))
        ema_update(self.target, self.module, self.cfg.target_ema)  # θ⁻ ← μθ⁻ + (1 − μ)θ, after the last step
        x_t = interpolate(x0, noise, t)
        with torch.no_grad():
            v = guided_velocity(self.teacher.transformer, x_t, t, cond, self.cond.empty(len(t)), w)
            x_s = x_t + (s - t).view(-1, 1, 1, 1) * v  # one teacher Euler step t -> s
            target = self.f(self.target, x_s, s, cond, w)  # = x_s exactly where s = 0
        pred = self.f(self.student, x_t, t, cond, w)
        loss = pseudo_huber(pred.float() - target.float(), self.huber_c)
        loss.backward()
        return loss, {}

    def extra_state(self) -> dict[str, Any]:
        return {"target": self.target.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])

    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]):
        steps = list(self.cfg.student_step_set)
        return export_student(self.teacher, ema, out_dir, self.cfg, info, steps, sampler="x0",
                              parameterization="consistency", guidance=teacher_guidance(self.cfg, self.teacher),
                              extra={"huber_c": self.huber_c})
