"""Guidance distillation, stage 1 (Meng et al. 2023, "On distillation of guided diffusion models", §3.1).

Classifier-free guidance costs two forwards per step: v_u + w·(v_c − v_u). A student with a guidance embedding
(the teacher's copy plus a zero-initialised w-embedding, so it starts as the teacher's conditional branch)
learns that guided output in one forward, for every w in [guidance_min, guidance_max]:

    loss = ‖v_student(x_t, t, c, w) − [v_u + w·(v_c − v_u)]_teacher(x_t, t, c)‖²,   t ~ U(0, 1], w ~ U[min, max]

with x_t from the data. The states the CFG sampler visits at w > 1 are not noised data (guidance pushes its
trajectories away from them), so ``guidance.trajectory_fraction`` of each batch can come instead from the
teacher's own guided trajectories (their states x(t_k) at the sampler's grid times, each trajectory at its own
w), where the student is then used; 0 (the default) is the paper's recipe. The student samples like the teacher
(same steps, same grid), a request's ``guidance`` is its input (the server accepts it: the card's transformer has
``guidance_embed``), and stage 2 is progressive distillation from it (`fewstep distill --method progressive
--teacher GUIDANCE_STUDENT`): each round's student keeps w as an input (training/distill/progressive.py).
"""

from __future__ import annotations

import math
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
from fewstep.training.distill.teacher_data import Trajectories, guided_trajectories
from fewstep.training.recipe import Context

MAX_TRAJECTORY_BYTES = 8 * 2**30  # every state of the trajectories is held in memory


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
        if not 0 <= s.trajectory_fraction <= 1:
            raise UsageError(f"guidance.trajectory_fraction must be in [0, 1], got {s.trajectory_fraction}")
        self.steps = list(s.student_steps) or [teacher.sampling.default_steps]
        if s.trajectory_fraction > 0:
            if s.trajectories < 1:
                raise UsageError(f"guidance.trajectories must be at least 1, got {s.trajectories}")
            size = s.trajectories * max(self.steps) * math.prod(teacher.latent_shape) * 4
            if size > MAX_TRAJECTORY_BYTES:
                raise UsageError(
                    f"guidance.trajectories={s.trajectories} at {max(self.steps)} steps would hold "
                    f"{size / 2**30:.1f} GiB of states in memory (at most {MAX_TRAJECTORY_BYTES / 2**30:.0f}): "
                    "ask for fewer trajectories"
                )
        self.source = DataSource(cfg, teacher)
        self.module = GuidanceLoss(build_student(teacher, guidance_embed=True))
        self.trajectories: Trajectories | None = None

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)  # the teacher is on the run's device now
        s = self.cfg.guidance
        if s.trajectory_fraction > 0:
            self.trajectories = guided_trajectories(
                self.teacher,
                s.trajectories,
                max(self.steps),  # the grid the exported student samples on (the teacher's own schedule)
                (s.guidance_min, s.guidance_max),
                Path(self.cfg.out) / "teacher-data",
                data=self.cfg.data,
                seed=self.cfg.seed,
            )

    def make_batch(self, generator: torch.Generator) -> dict[str, Any]:
        b, s = self.cfg.batch_size, self.cfg.guidance
        batch = self.source.draw(b, generator)
        batch["t"] = 1 - torch.rand(b, generator=generator)  # U(0, 1]: every time the sampler visits, t = 1 too
        batch["noise"] = torch.randn(b, *self.teacher.latent_shape, generator=generator)
        batch["w"] = s.guidance_min + (s.guidance_max - s.guidance_min) * torch.rand(b, generator=generator)
        if self.trajectories is not None:  # rows whose x_t, t, w and caption are a trajectory's state instead
            on = torch.rand(b, generator=generator) < s.trajectory_fraction  # (b,)
            traj = self.trajectories.draw(b, generator)
            batch["on_trajectory"], batch["x_trajectory"] = on, traj["x_t"]
            batch["t"] = torch.where(on, traj["t"], batch["t"])
            batch["w"] = torch.where(on, traj["w"], batch["w"])
            batch["captions"] = [
                c if o else d for c, d, o in zip(traj["captions"], batch["captions"], on.tolist(), strict=True)
            ]
        return batch

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        x0, noise, t, cond, w = batch["x0"], batch["noise"], batch["t"], batch["cond"], batch["w"]
        x_t = interpolate(x0, noise, t)
        if "on_trajectory" in batch:
            x_t = torch.where(batch["on_trajectory"].view(-1, 1, 1, 1), batch["x_trajectory"].to(x_t.dtype), x_t)
        target = guided_velocity(self.teacher.transformer, x_t, t, cond, self.cond.empty(len(t)), w)
        return self.ctx.module(x_t, t, cond, w, target)  # the DDP-wrapped module: gradients averaged

    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]):
        s, steps = self.cfg.guidance, self.steps
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
