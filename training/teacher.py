"""Stage 2: the teacher, a rectified-flow MM-DiT trained with its text encoder on autoencoder latents.

Loss (Liu et al. 2022; minRF): t ~ logit-normal, x_t = (1 − t)·x0 + t·ε, ‖F(x_t, t, c) − (ε − x0)‖².
Captions are dropped to "" with probability caption_dropout so the teacher supports classifier-free
guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.errors import UsageError
from fewstep.models.config import get_variant
from fewstep.models.flow import interpolate, logit_normal_t, timesteps, velocity_target
from fewstep.models.mmdit import MMDiT
from fewstep.models.pipeline import TextToImage, load_autoencoder
from fewstep.models.text import TextEncoder, Tokenizer
from fewstep.training.config import TrainConfig
from fewstep.training.data import load_data, sample_batch, vocabulary
from fewstep.training.recipe import RecipeBase


class FlowMatchingLoss(nn.Module):
    def __init__(self, text_encoder: TextEncoder, transformer: MMDiT):
        super().__init__()
        self.text_encoder, self.transformer = text_encoder, transformer

    def forward(self, x0, ids, mask, t, noise):
        cond = self.text_encoder(ids, mask)
        x_t = interpolate(x0, noise, t)
        v = self.transformer(x_t, t, cond.tokens, cond.mask, cond.pooled)
        loss = (v.float() - velocity_target(x0, noise).float()).pow(2).mean()
        return loss, {}


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


class TeacherRecipe(RecipeBase):
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        config = get_variant(cfg.model)
        autoencoder = None
        if config.autoencoder is not None:
            if not cfg.autoencoder:
                raise UsageError(
                    f"model {cfg.model!r} works in latent space: set autoencoder to a trained autoencoder "
                    "checkpoint (fewstep train --config configs/digits-autoencoder.yaml writes one)"
                )
            autoencoder = load_autoencoder(cfg.autoencoder)
            config = config.with_overrides(autoencoder=autoencoder.cfg)
        self.data = load_data(cfg.data, "train", config.image_size)
        self.tokenizer = Tokenizer(vocabulary(self.data), config.text.max_length)
        if len(self.tokenizer) > config.text.vocab_size:  # your own captions: grow the embedding to fit
            config = config.with_overrides(text=replace(config.text, vocab_size=len(self.tokenizer)))
        self.model = TextToImage.build(config, self.tokenizer, autoencoder)
        self.module = FlowMatchingLoss(self.model.text_encoder, self.model.transformer)

    def make_batch(self, generator: torch.Generator) -> dict[str, Any]:
        b = sample_batch(self.data, self.cfg.batch_size, generator)
        ids, mask = self.tokenizer.encode(drop_captions(b.captions, self.cfg.caption_dropout, generator))
        t = logit_normal_t(len(ids), generator, self.cfg.t_logit_mean, self.cfg.t_logit_std)
        noise = torch.randn(len(ids), *self.model.latent_shape, generator=generator)
        return {"images": b.images, "ids": ids, "mask": mask, "t": t, "noise": noise}

    @torch.no_grad()
    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        images = batch.pop("images").to(device)
        ae = self.model.autoencoder
        if ae is not None:
            ae.to(device)
        x0 = ae.encode(images) if ae is not None else images
        return {"x0": x0, **{k: v.to(device) for k, v in batch.items()}}

    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]) -> TextToImage:
        cfg = self.cfg
        model = TextToImage(
            self.model.config, self.tokenizer, ema.text_encoder, ema.transformer, self.model.autoencoder
        )
        model.to("cpu")
        steps = cfg.default_steps
        schedule = "uniform" if cfg.schedule_shift == 1.0 else "shifted"
        card = {
            "name": cfg.name,
            "role": "teacher",
            "parameterization": "velocity",
            "sampling": {
                "default_steps": steps,
                "sampler": "euler",
                "any_steps": True,
                "schedule": schedule,
                "shift": cfg.schedule_shift,
                "guidance": cfg.guidance,
                "timesteps": {str(steps): timesteps(steps, schedule, cfg.schedule_shift)},
            },
            "training": {"method": "rectified-flow", **info},
            "data": {
                "name": cfg.data,
                "split": "train",
                "images": len(self.data),
                "captions": "training/data.py TEMPLATES" if cfg.data in ("digits", "synthetic") else "folder",
            },
        }
        model.save(out_dir, card, dtype=cfg.export_dtype, overwrite=True)
        print(f"teacher exported to {out_dir}")
        return model
