"""adaLN modulation: LayerNorm without affine, then x·(1 + scale) + shift per sample (DiT, Flux)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adaln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """x: (B, L, C); shift, scale: (B, 1, C). LayerNorm statistics in fp32, output in x's dtype."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (normed * (1 + scale.float()) + shift.float()).to(x.dtype)
