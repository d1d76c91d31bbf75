"""The one place where the model calls attention, QK-norm+RoPE and adaLN modulation.

Every block goes through these three functions with the backend its model was given ("torch" or "triton",
resolved once by ``kernels.runtime.resolve``), so both paths run the same model code. The Triton kernels
are forward-only: whenever autograd is recording (training, distillation) the PyTorch references run, so
gradients always flow (docs/performance.md, "Kernels").
"""

from __future__ import annotations

import torch

from fewstep.kernels.attention import attention_ref
from fewstep.kernels.modulation import adaln_modulate_ref
from fewstep.kernels.qk_norm_rope import qk_norm_rope_ref


def _triton(backend: str, *tensors: torch.Tensor | None) -> bool:
    if backend != "triton":
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def qk_norm_rope(
    qkv, cos, sin, q_scale, k_scale, num_heads, eps, n_txt=0, q_scale_txt=None, k_scale_txt=None, backend: str = "torch"
):
    """(B, L, 3·H·D) -> q, k, v (B, H, L, D): per-head RMSNorm of q and k, then RoPE."""
    if _triton(backend, qkv, q_scale, k_scale, q_scale_txt, k_scale_txt):
        from fewstep.kernels.qk_norm_rope_triton import qk_norm_rope_triton

        return qk_norm_rope_triton(qkv, cos, sin, q_scale, k_scale, num_heads, eps, n_txt, q_scale_txt, k_scale_txt)
    return qk_norm_rope_ref(qkv, cos, sin, q_scale, k_scale, num_heads, eps, n_txt, q_scale_txt, k_scale_txt)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, backend: str = "torch"
) -> torch.Tensor:
    """(B, H, L, D) ×3 -> (B, L, H·D)."""
    if _triton(backend, q, k, v):
        from fewstep.kernels.attention_triton import attention_triton

        return attention_triton(q, k, v, key_mask)
    return attention_ref(q, k, v, key_mask)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """LayerNorm(x)·(1 + scale) + shift."""
    if _triton(backend, x, shift, scale):
        from fewstep.kernels.modulation_triton import adaln_modulate_triton

        return adaln_modulate_triton(x, shift, scale)
    return adaln_modulate_ref(x, shift, scale)
