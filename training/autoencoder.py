"""Stage 1: the autoencoder whose latents the transformer works in (as Flux works in its VAE's latents)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.errors import UsageError
from fewstep.models.autoencoder import Autoencoder
from fewstep.models.checkpoint import save_checkpoint
from fewstep.models.config import get_variant
from fewstep.models.pipeline import AUTOENCODER
from fewstep.training.config import TrainConfig
from fewstep.training.data import load_data, sample_batch
from fewstep.training.recipe import RecipeBase


class AutoencoderLoss(nn.Module):
    def __init__(self, ae: Autoencoder, kl_weight: float):
        super().__init__()
        self.ae, self.kl_weight = ae, kl_weight

    def forward(self, images: torch.Tensor, eps: torch.Tensor):
        recon, kl = self.ae(images, eps)
        mse = (recon - images).pow(2).mean()
        return mse + self.kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}


class AutoencoderRecipe(RecipeBase):
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        ae_cfg = get_variant(cfg.model).autoencoder
        if ae_cfg is None:
            raise UsageError(f"model variant {cfg.model!r} works in pixel space: it has no autoencoder to train")
        self.ae_cfg = ae_cfg
        self.data = load_data(cfg.data, "train")
        self.module = AutoencoderLoss(Autoencoder(ae_cfg), cfg.kl_weight)
        self.latent = (ae_cfg.latent_channels, 32 // 2 ** (len(ae_cfg.channels) - 1))

    def make_batch(self, generator: torch.Generator) -> dict[str, Any]:
        b = sample_batch(self.data, self.cfg.batch_size, generator)
        c, s = self.latent
        return {"images": b.images, "eps": torch.randn(len(b.images), c, s, s, generator=generator)}

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]) -> Any:
        ae: Autoencoder = ema.ae.cpu().eval()
        g = torch.Generator().manual_seed(1234)
        # normalise latents to zero mean, unit variance (SD's scaling factor, measured, not guessed)
        means = torch.cat([ae.encoder(sample_batch(self.data, 256, g).images)[0] for _ in range(8)])
        shift, scale = float(means.mean()), float(1.0 / means.std())
        final = Autoencoder(replace(self.ae_cfg, shift=shift, scale=scale))
        final.load_state_dict(ae.state_dict())
        valid = load_data(self.cfg.data, "valid")
        images = sample_batch(valid, 512, torch.Generator().manual_seed(99)).images
        mse = float((final.decode(final.encode(images)) - images).pow(2).mean())
        card = {
            "name": f"{self.cfg.name}",
            "role": "autoencoder",
            "model": {**vars(final.cfg), "channels": list(final.cfg.channels)},
            "training": {"method": "vae", **info},
            "data": {"name": self.cfg.data, "split": "train"},
            "metrics": {"reconstruction_mse_valid": round(mse, 5), "latent_shift": shift, "latent_scale": scale},
        }
        save_checkpoint(out_dir, card, {AUTOENCODER: final}, dtype=self.cfg.export_dtype, overwrite=True)
        print(f"autoencoder exported to {out_dir}: validation MSE {mse:.4f} on [-1, 1]")
        return final
