"""Per-head QK RMSNorm followed by RoPE (Flux's adjacent-pair rotation).

Reference semantics (what any kernel here must compute):
    q, k, v = split(qkv)                          # qkv: (B, L, 3·H·D), the fused projection's output
    q = rms_norm(q) · scale_q   (fp32)            # per head, over D; text tokens may use their own scales
    q = rope(q, cos, sin)       (fp32)            # pairs (x[2j], x[2j+1]) rotated by angle_j
and the same for k; v passes through. Outputs are (B, H, L, D) in the input dtype.
"""

from __future__ import annotations

import torch
from einops import rearrange


def _segment_scales(scale: torch.Tensor, scale_txt: torch.Tensor | None, n_txt: int, length: int) -> torch.Tensor:
    """(L, D) per-token scales: the text scales for the first n_txt tokens, the image scales after."""
    if scale_txt is None or n_txt == 0:
        return scale.float().expand(length, -1)
    return torch.cat([scale_txt.float().expand(n_txt, -1), scale.float().expand(length - n_txt, -1)])


def rms_norm_ref(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32 (Flux computes QK norms in fp32 for stability)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs: out[2j] = x[2j]·cos_j − x[2j+1]·sin_j, out[2j+1] = x[2j]·sin_j + x[2j+1]·cos_j.

    x: (..., L, D) fp32; cos, sin: (L, D/2) fp32.
    """
    x = x.unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def qk_norm_rope_ref(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
    n_txt: int = 0,
    q_scale_txt: torch.Tensor | None = None,
    k_scale_txt: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, L, 3·H·D) -> q, k, v each (B, H, L, D) in qkv's dtype."""
    q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=num_heads)
    length = qkv.shape[1]
    sq = _segment_scales(q_scale, q_scale_txt, n_txt, length)
    sk = _segment_scales(k_scale, k_scale_txt, n_txt, length)
    q = rope_ref(rms_norm_ref(q, sq, eps), cos, sin).to(qkv.dtype)
    k = rope_ref(rms_norm_ref(k, sk, eps), cos, sin).to(qkv.dtype)
    return q, k, v
