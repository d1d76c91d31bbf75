"""Building blocks of the Flux-style MM-DiT (black-forest-labs/flux modules/layers.py, scaled down)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fewstep.models import ops


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0):
    """Sinusoidal embedding of t ∈ [0, 1] (scaled by 1000, as Flux does). (B,) -> (B, dim)."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(nn.functional.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    """Learned per-head RMSNorm scales for q and k; the norm itself runs fused in ops.qk_norm_rope."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.q_scale = nn.Parameter(torch.ones(head_dim))
        self.k_scale = nn.Parameter(torch.ones(head_dim))


@dataclass
class ModulationOut:
    shift: torch.Tensor  # (B, 1, C)
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    """adaLN parameters from the conditioning vector. Zero-initialised (DiT): every block starts as identity."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, vec: torch.Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        first = ModulationOut(*out[:3])
        return first, ModulationOut(*out[3:]) if self.multiplier == 6 else None


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class StreamAttention(nn.Module):
    """One stream's qkv projection, QK-norm scales and output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class DoubleStreamBlock(nn.Module):
    """Text and image keep their own weights; one joint attention over cat(text, image)."""

    kernels = "torch"  # the ops backend, set by MMDiT.set_kernels

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        mlp_hidden = int(dim * mlp_ratio)
        self.img_mod, self.txt_mod = Modulation(dim, double=True), Modulation(dim, double=True)
        self.img_attn, self.txt_attn = StreamAttention(dim, num_heads), StreamAttention(dim, num_heads)
        self.img_mlp, self.txt_mlp = MLP(dim, mlp_hidden), MLP(dim, mlp_hidden)

    def forward(self, img, txt, vec, cos, sin, key_mask):
        # img: (B, Li, C), txt: (B, Lt, C), vec: (B, C)
        kb = self.kernels
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_qkv = self.img_attn.qkv(ops.modulate(img, img_mod1.shift, img_mod1.scale, kb))  # (B, Li, 3C)
        txt_qkv = self.txt_attn.qkv(ops.modulate(txt, txt_mod1.shift, txt_mod1.scale, kb))  # (B, Lt, 3C)
        n_txt = txt.shape[1]
        q, k, v = ops.qk_norm_rope(
            torch.cat([txt_qkv, img_qkv], dim=1),
            cos,
            sin,
            self.img_attn.norm.q_scale,
            self.img_attn.norm.k_scale,
            self.num_heads,
            self.eps,
            n_txt,
            self.txt_attn.norm.q_scale,
            self.txt_attn.norm.k_scale,
            backend=kb,
        )  # (B, H, Lt + Li, D)
        attn = ops.attention(q, k, v, key_mask, kb)  # (B, Lt + Li, C)
        txt_out, img_out = attn[:, :n_txt], attn[:, n_txt:]

        img = img + img_mod1.gate * self.img_attn.proj(img_out)
        img = img + img_mod2.gate * self.img_mlp(ops.modulate(img, img_mod2.shift, img_mod2.scale, kb))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_out)
        txt = txt + txt_mod2.gate * self.txt_mlp(ops.modulate(txt, txt_mod2.shift, txt_mod2.scale, kb))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One linear makes qkv and the MLP input; one linear maps cat(attention, gelu(mlp)) back (Flux)."""

    kernels = "torch"

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.num_heads, self.eps, self.dim = num_heads, eps, dim
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x, vec, cos, sin, key_mask):
        # x: (B, L, C) = cat(text, image)
        kb = self.kernels
        mod, _ = self.modulation(vec)
        modulated = ops.modulate(x, mod.shift, mod.scale, kb)
        qkv, mlp = self.linear1(modulated).split([3 * self.dim, self.mlp_hidden], -1)  # qkv: a strided view
        q, k, v = ops.qk_norm_rope(
            qkv, cos, sin, self.norm.q_scale, self.norm.k_scale, self.num_heads, self.eps, backend=kb
        )
        attn = ops.attention(q, k, v, key_mask, kb)  # (B, L, C)
        out = self.linear2(torch.cat([attn, nn.functional.gelu(mlp, approximate="tanh")], dim=-1))
        return x + mod.gate * out


class LastLayer(nn.Module):
    """adaLN then a linear to patch pixels; zero-initialised so the untrained model predicts v = 0."""

    kernels = "torch"

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)
        for layer in (self.adaLN_modulation[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(ops.modulate(x, shift, scale, self.kernels))
