"""The one place where the model calls attention, QK-norm+RoPE and adaLN modulation.

Every block goes through these three functions, so swapping in a fused kernel touches only this file.
"""

from __future__ import annotations

import torch

from kernels.attention import attention_ref
from kernels.modulation import adaln_modulate_ref
from kernels.qk_norm_rope import qk_norm_rope_ref


def qk_norm_rope(qkv, cos, sin, q_scale, k_scale, num_heads, eps, n_txt=0, q_scale_txt=None, k_scale_txt=None):
    """(B, L, 3·H·D) -> q, k, v (B, H, L, D): per-head RMSNorm of q and k, then RoPE."""
    return qk_norm_rope_ref(qkv, cos, sin, q_scale, k_scale, num_heads, eps, n_txt, q_scale_txt, k_scale_txt)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L, D) ×3 -> (B, L, H·D)."""
    return attention_ref(q, k, v, key_mask)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x)·(1 + scale) + shift."""
    return adaln_modulate_ref(x, shift, scale)
