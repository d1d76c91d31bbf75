"""A small convolutional VAE, the stand-in for Flux's VAE: images <-> a compact latent grid.

Flux's transformer works on its VAE's latents; so does ours. 32×32×3 -> 8×8×4 with the default config.
The KL term is tiny (as in Stable Diffusion's AutoencoderKL): it only keeps the latent space smooth.
"""

from __future__ import annotations

import torch
from torch import nn

from fewstep.models import graphs
from fewstep.models.config import AutoencoderConfig


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            layers.append(ResBlock(ch[i - 1] if i else ch[0], c))
            if i < len(ch) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(min(8, ch[-1]), ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_out(nn.functional.silu(self.norm_out(self.body(self.conv_in(x)))))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.channels[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            layers.append(ResBlock(c, c))
            if i < len(ch) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, ch[i + 1], 3, padding=1)]
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(min(8, ch[-1]), ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(nn.functional.silu(self.norm_out(self.body(self.conv_in(z)))))


class Autoencoder(graphs.GraphsOwner):
    """encode/decode work on *normalised* latents: z = (mean - shift) · scale, about unit variance."""

    graph_method = "_decode"  # decoding as frozen graphs (use_graphs, models/graphs.py)

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [-1, 1] -> (B, C, 8, 8), deterministic (the posterior mean)."""
        mean, _ = self.encoder(x)
        return (mean - self.cfg.shift) * self.cfg.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, 8, 8) normalised latents -> (B, 3, 32, 32), roughly in [-1, 1]."""
        return graphs.run(self.graphs, self._decode, z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.cfg.scale + self.cfg.shift)

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        """Training pass: returns (reconstruction, kl) with the posterior sample mean + std·eps."""
        mean, logvar = self.encoder(x)
        z = mean + torch.exp(0.5 * logvar) * eps
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        return self.decoder(z), kl
