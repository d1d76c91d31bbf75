"""Progressive distillation (Salimans & Ho 2022), on the flow ODE with Euler steps.

Round k: the student starts as its teacher; from x_t on the student's N/2-step grid the teacher takes two
Euler steps of 1/N (with CFG in the first round, whose teacher is the real one); the student learns the
single velocity that lands on the same point. Each round halves the step count; each round's student is
saved and is the next round's teacher.
"""

from __future__ import annotations

import copy
from dataclasses import replace
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
    export_student,
    guided_velocity,
    load_exported,
    teacher_guidance,
    velocity,
)
from fewstep.training.distill.config import DistillConfig
from fewstep.training.distill.losses import progressive_velocity_target
from fewstep.training.loop import train
from fewstep.training.recipe import Context


class ProgressiveLoss(nn.Module):
    """Student loss for one round; the round's teacher (frozen) is held outside the parameter list."""

    def __init__(self, student: nn.Module, round_teacher: nn.Module, teacher_steps: int, guidance: float, empty):
        super().__init__()
        self.student = student
        self._teacher = [round_teacher]  # a list: not registered, not optimised, not in the state dict
        self.n, self.guidance, self.empty = teacher_steps, guidance, empty

    def forward(self, x0, noise, t, cond, w=None):
        """``w`` (B,): a w-conditioned teacher's scale, an input of teacher and student alike; None: CFG."""
        teacher = self._teacher[0]
        x_t = interpolate(x0, noise, t)
        dt = 1.0 / self.n
        with torch.no_grad():
            x = x_t
            for k in range(2):  # two teacher steps of 1/N: t -> t − 1/N -> t − 2/N
                tk = t - k * dt
                if w is None:
                    v = guided_velocity(teacher, x, tk, cond, self.empty(len(t)), self.guidance)
                else:
                    v = velocity(teacher, x, tk, cond, guidance=w)
                x = x - dt * v
            target = progressive_velocity_target(x_t, x, t, t - 2 * dt)
        v_student = velocity(self.student, x_t, t, cond, guidance=w)
        return (v_student.float() - target.float()).pow(2).mean(), {}


class ProgressiveRound(DistillRecipe):
    def __init__(
        self, cfg: DistillConfig, teacher: TextToImage, round_teacher: nn.Module, teacher_steps: int, guidance: float
    ):
        super().__init__(cfg, teacher)
        self.source = DataSource(cfg, teacher)
        self.student_steps = teacher_steps // 2
        student = copy.deepcopy(round_teacher).float().train().requires_grad_(True)  # a bf16 Flux teacher: fp32
        student.default_guidance = None  # a w-conditioned chain passes w (FLUX.1-dev's teacher included)
        self.module = ProgressiveLoss(
            student, round_teacher.eval().requires_grad_(False), teacher_steps, guidance, self.cond.empty
        )

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.module._teacher[0].to(ctx.device)

    def make_batch(self, generator: torch.Generator) -> dict[str, Any]:
        b = self.cfg.batch_size
        batch = self.source.draw(b, generator)
        j = torch.randint(1, self.student_steps + 1, (b,), generator=generator)  # student grid point
        batch["t"] = j.float() / self.student_steps
        batch["noise"] = torch.randn(b, *self.teacher.latent_shape, generator=generator)
        if self.w_conditioned:
            lo, hi = self.w_range
            batch["w"] = lo + (hi - lo) * torch.rand(b, generator=generator)
        return batch

    @property
    def w_range(self) -> tuple[float, float]:
        """The w a w-conditioned chain trains on: the config's, else the range its teacher learnt."""
        s, card = self.cfg.progressive, self.teacher.card
        learnt = (card.training.get("resolved") or {}).get("guidance_range") if card else None
        lo, hi = learnt or (1.0, 4.0)
        return (lo if s.guidance_min is None else s.guidance_min, hi if s.guidance_max is None else s.guidance_max)

    @property
    def w_conditioned(self) -> bool:
        return bool(self.module.student.cfg.guidance_embed)

    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]):
        return export_student(
            self.teacher,
            ema.student,
            out_dir,
            self.cfg,
            info,
            [self.student_steps],
            # a w-conditioned student's default w is its teacher's; a CFG-distilled one has guidance built in (1)
            guidance=self.teacher.sampling.guidance if self.w_conditioned else 1.0,
            extra={
                "round_teacher_steps": self.module.n,
                **({"guidance_range": list(self.w_range)} if self.w_conditioned else {}),
            },
        )


def run_progressive(cfg: DistillConfig, out: Path, teacher: TextToImage) -> list[Path]:
    n = cfg.progressive.start_steps
    if n < 2 or n & (n - 1):
        raise UsageError(f"progressive.start_steps must be a power of two >= 2, got {n}")
    rounds = n.bit_length() - 1
    per_round = cfg.progressive.round_steps or max(1, cfg.max_steps // rounds)
    round_teacher, guidance, exported = teacher.transformer, teacher_guidance(cfg, teacher), []
    while n > 1:
        round_cfg = replace(cfg, max_steps=per_round, name=f"{cfg.name}-{n // 2}step")
        recipe = ProgressiveRound(round_cfg, teacher, round_teacher, n, guidance)
        round_dir = out / f"round-{n}to{n // 2}"
        train(round_cfg, recipe, out_dir=round_dir)
        exported.append(round_dir / "export")
        # the EMA student teaches next; loaded on the CPU, moved to the run's device by ProgressiveRound.setup
        round_teacher = load_exported(teacher, round_dir / "export")
        guidance, n = 1.0, n // 2  # CFG is distilled into the first student
    return exported
