"""The Flux-style multimodal diffusion transformer: v = F(x_t, t, text[, guidance])."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from fewstep.models.config import TransformerConfig
from fewstep.models.layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding
from fewstep.models.rope import position_ids, rope_tables


class MMDiT(nn.Module):
    def __init__(self, cfg: TransformerConfig, text_dim: int, latent_size: int):
        super().__init__()
        if sum(cfg.axes_dim) != cfg.head_dim:
            raise ValueError(f"axes_dim {cfg.axes_dim} must sum to head_dim {cfg.head_dim}")
        if latent_size % cfg.patch_size:
            raise ValueError(f"latent size {latent_size} is not a multiple of patch size {cfg.patch_size}")
        self.cfg = cfg
        self.latent_size = latent_size
        p, dim = cfg.patch_size, cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels * p * p, dim)
        self.txt_in = nn.Linear(text_dim, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(text_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if cfg.guidance_embed else None
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm_eps) for _ in range(cfg.depth_double)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm_eps) for _ in range(cfg.depth_single)
        )
        self.final_layer = LastLayer(dim, p * p * cfg.in_channels)
        self._rope_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def kernels(self) -> str:
        return self.final_layer.kernels

    def set_kernels(self, backend: str) -> MMDiT:
        """Route every block's attention, QK-norm+RoPE and modulation to "torch" or "triton" (resolved by
        kernels.runtime.resolve; the Triton path serves inference, autograd always takes the references)."""
        if backend not in ("torch", "triton"):
            raise ValueError(f"kernel backend must be 'torch' or 'triton', got {backend!r}")
        for m in self.modules():
            if isinstance(m, (DoubleStreamBlock, SingleStreamBlock, LastLayer)):
                m.kernels = backend
        return self

    def _rope(self, n_txt: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n_txt, device)
        if key not in self._rope_cache:
            grid = self.latent_size // self.cfg.patch_size
            cos, sin = rope_tables(position_ids(n_txt, grid, grid), self.cfg.axes_dim, self.cfg.theta)
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def forward(
        self,
        x: torch.Tensor,  # (B, C, H, W) noisy latents
        t: torch.Tensor,  # (B,) in [0, 1]; 1 = pure noise
        txt: torch.Tensor,  # (B, Lt, text_dim) text-encoder tokens
        txt_mask: torch.Tensor,  # (B, Lt) bool, True = real token
        pooled: torch.Tensor,  # (B, text_dim)
        guidance: torch.Tensor | None = None,  # (B,) CFG scale, for guidance-embedded students
        return_features: bool = False,  # also return the image tokens after every block (discriminators)
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        p = self.cfg.patch_size
        h, w = x.shape[-2:]
        img = self.img_in(rearrange(x, "B C (h ph) (w pw) -> B (h w) (C ph pw)", ph=p, pw=p))  # (B, Li, D)
        vec = self.time_in(timestep_embedding(t, 256).to(img.dtype)) + self.vector_in(pooled)  # (B, D)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model embeds the guidance scale: pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256, time_factor=1.0).to(img.dtype))
        txt = self.txt_in(txt)  # (B, Lt, D)
        n_txt = txt.shape[1]
        cos, sin = self._rope(n_txt, x.device)
        key_mask = torch.cat([txt_mask, txt_mask.new_ones(txt_mask.shape[0], img.shape[1])], dim=1)
        features: list[torch.Tensor] = []
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, cos, sin, key_mask)
            features.append(img)
        xs = torch.cat([txt, img], dim=1)  # (B, Lt + Li, D)
        for block in self.single_blocks:
            xs = block(xs, vec, cos, sin, key_mask)
            features.append(xs[:, n_txt:])
        out = self.final_layer(xs[:, n_txt:], vec)  # (B, Li, p·p·C)
        out = rearrange(out, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=h // p, w=w // p, ph=p, pw=p)
        return (out, features) if return_features else out
