"""DMD2 (Yin et al. 2024): distribution matching with a trained fake score, a GAN head, no regression pairs.

generator G (from the teacher) -> x;  noise x to t ∈ [t_min, t_max];
real score: the frozen teacher with CFG;  fake score: a trainable copy of the teacher that keeps fitting
G's current outputs (flow-matching loss), ``fake_updates`` times per generator update, each on a fresh batch of
G's samples, at the noise levels it is queried at; G is then judged on a batch the fake score has not seen
(the order of the reference implementation, tianweiy/DMD2);
G follows dmd_gradient (real − fake direction), plus a small non-saturating GAN loss from a classifier head
on the fake score's features, trained on real data against G's samples.
generator_steps = 4 trains a 4-step generator with backward simulation: its own earlier steps, not data,
produce the inputs of later steps (DMD2 §4.5).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.errors import UsageError
from fewstep.models.flow import interpolate, timesteps, x0_from_velocity
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
from fewstep.training.distill.losses import dmd_gradient, dmd_loss, gan_discriminator, gan_generator
from fewstep.training.recipe import Context

GAN_DISC_WEIGHT = 1e-2  # DMD2's weight of the classifier loss in the fake-score update


class FakeScore(nn.Module):
    """The fake score network with DMD2's classifier head on its last image features."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        dim = net.cfg.hidden_size
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, x, t, cond, with_logits: bool = False):
        v, feats = self.net(x, t, cond.tokens, cond.mask, cond.pooled, return_features=True)
        if not with_logits:
            return v
        return v, self.head(feats[-1].mean(1)).squeeze(-1)  # (B,)


class DMD2Recipe(DistillRecipe):
    def __init__(self, cfg: DistillConfig, teacher: TextToImage):
        super().__init__(cfg, teacher)
        self.s = cfg.dmd2
        if self.s.generator_steps not in (1, 2, 4):
            raise UsageError(f"dmd2.generator_steps must be 1, 2 or 4, got {self.s.generator_steps}")
        self.source = DataSource(cfg, teacher)
        self.module = build_student(teacher)
        self.grid = timesteps(self.s.generator_steps)
        self.guidance = teacher_guidance(cfg, teacher)

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        fake = FakeScore(copy.deepcopy(self.teacher.transformer).float())  # trained: fp32 weights, as the student
        self.fake = ctx.auxiliary("fake_score", fake, lr=self.s.fake_lr or self.cfg.lr, export=True)

    def make_batch(self, generator: torch.Generator) -> dict[str, Any]:
        b, shape, k, n = self.cfg.batch_size, self.teacher.latent_shape, self.s.fake_updates, len(self.grid)
        batch = self.source.draw(b, generator)  # real images for the GAN head
        # every tensor has the batch first, so DDP ranks shard the batch (loop.shard), not the update index.
        # Each fake update gets its own generator batch (fake_z, fake_sim): the fake score never fits the samples
        # the generator is then judged on (the DMD2 reference generates afresh for every update). Every noise
        # level is U[t_min, t_max]: the fake score is trained where the distribution-matching gradient asks it.

        def unif(*size: int) -> torch.Tensor:
            return self.s.t_min + (self.s.t_max - self.s.t_min) * torch.rand(*size, generator=generator)

        batch.update(
            z=torch.randn(b, *shape, generator=generator),
            sim_noise=torch.randn(n, b, *shape, generator=generator).transpose(0, 1),
            k=torch.randint(0, self.s.generator_steps, (1,), generator=generator).expand(b).clone(),
            fake_z=torch.randn(k, b, *shape, generator=generator).transpose(0, 1),
            fake_sim=torch.randn(k, n, b, *shape, generator=generator).permute(2, 0, 1, *range(3, 3 + len(shape))),
            fake_k=torch.randint(0, self.s.generator_steps, (k,), generator=generator).expand(b, k).clone(),
            fake_t=unif(b, k),
            fake_eps=torch.randn(k, b, *shape, generator=generator).transpose(0, 1),
            real_eps=torch.randn(k, b, *shape, generator=generator).transpose(0, 1),
            dm_t=unif(b),
            dm_eps=torch.randn(b, *shape, generator=generator),
            gan_t=unif(b),
            gan_eps=torch.randn(b, *shape, generator=generator),
        )
        return batch

    def generate(self, z: torch.Tensor, cond, k: int, sim_noise: torch.Tensor, grad: bool = True) -> torch.Tensor:
        """Backward simulation: run the generator's own first k steps without gradients, then step k (with
        gradients when ``grad``)."""
        ones = torch.ones(len(z), device=z.device)
        x = z
        with torch.no_grad():
            for j in range(k):
                x0 = x0_from_velocity(x, velocity(self.module, x, ones * self.grid[j], cond), ones * self.grid[j])
                x = interpolate(x0, sim_noise[:, j], ones * self.grid[j + 1])
        t = ones * self.grid[k]
        with torch.set_grad_enabled(grad):
            return x0_from_velocity(x, velocity(self.ctx.module if grad else self.module, x, t, cond), t)

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The two-speed loop in the reference's order: the loop applied the previous generator update; now the
        fake score takes ``fake_updates`` steps, each on a fresh batch of the current generator's samples; then
        the generator is judged on a batch of its own that the fake score has not seen."""
        cond, x_real = batch["cond"], batch["x0"]
        fake_logs = self._update_fake(x_real, cond, batch)

        # generator: distribution matching + GAN, on samples the fake score has never fitted
        x_gen = self.generate(batch["z"], cond, int(batch["k"][0]), batch["sim_noise"])
        t, eps = batch["dm_t"], batch["dm_eps"]
        x_t = interpolate(x_gen, eps, t)
        with torch.no_grad():
            v_real = guided_velocity(self.teacher.transformer, x_t, t, cond, self.cond.empty(len(t)), self.guidance)
            v_fake = self.fake.module(x_t, t, cond)
            grad = dmd_gradient(x_gen.detach(), x0_from_velocity(x_t, v_real, t), x0_from_velocity(x_t, v_fake, t))
        loss_dm = dmd_loss(x_gen.float(), grad.float())
        x_gan = interpolate(x_gen, batch["gan_eps"], batch["gan_t"])
        _, logits = self.fake.module(x_gan, batch["gan_t"], cond, True)
        loss_gan = gan_generator(logits)
        loss = loss_dm + self.s.gan_weight * loss_gan
        return loss, {"loss_dm": loss_dm.detach(), "loss_gan_g": loss_gan.detach(), **fake_logs}

    def _update_fake(self, x_real: torch.Tensor, cond, batch: dict[str, Any]) -> dict[str, Any]:
        for i in range(self.s.fake_updates):
            x_gen = self.generate(
                batch["fake_z"][:, i], cond, int(batch["fake_k"][0, i]), batch["fake_sim"][:, i], False
            )
            t, eps = batch["fake_t"][:, i], batch["fake_eps"][:, i]
            v, logits_fake = self.fake(interpolate(x_gen, eps, t), t, cond, True)
            loss_fm = F.mse_loss(v.float(), (eps - x_gen).float())
            _, logits_real = self.fake(interpolate(x_real, batch["real_eps"][:, i], t), t, cond, True)
            loss_d = gan_discriminator(logits_real, logits_fake)
            self.fake.update(loss_fm + GAN_DISC_WEIGHT * loss_d)
        return {"loss_fake": loss_fm.detach(), "loss_gan_d": loss_d.detach()}

    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]):
        steps = self.s.generator_steps
        return export_student(
            self.teacher,
            ema,
            out_dir,
            self.cfg,
            info,
            [steps],
            sampler="x0",
            grids={steps: self.grid},
            extra={"teacher_guidance": self.guidance},
        )
