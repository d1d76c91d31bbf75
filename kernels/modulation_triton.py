"""adaLN modulation in Triton; ``adaln_modulate_ref`` in modulation.py defines the result.

LayerNorm without affine then x·(1 + scale) + shift, per sample: one program per BLOCK_R rows of one
sample reads each row once, takes mean and variance in fp32 and writes the modulated row, instead of
PyTorch's LayerNorm, multiply and add passes over memory. shift and scale are read through their strides:
in the model they are chunks of one (B, 1, k·C) modulation output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fewstep.kernels.runtime import interpreting


@triton.jit
def _adaln_modulate_kernel(
    X,
    SHIFT,
    SCALE,
    OUT,
    stride_xb,
    stride_xl,
    stride_sb,
    stride_cb,
    stride_ob,
    stride_ol,
    L,
    C,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r, b = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < L)[:, None] & col_ok[None, :]
    x = tl.load(X + b * stride_xb + rows[:, None] * stride_xl + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    diff = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / C
    normed = diff / tl.sqrt(var + eps)[:, None]
    shift = tl.load(SHIFT + b * stride_sb + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_cb + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = normed * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(OUT + b * stride_ob + rows[:, None] * stride_ol + cols[None, :], y.to(OUT.dtype.element_ty), mask=ok)


def adaln_modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """Same contract as ``adaln_modulate_ref``: x (B, L, C); shift, scale (B, 1, C) -> (B, L, C) in x's dtype."""
    b, length, c = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        if t.shape != (b, 1, c):
            raise ValueError(f"{name} must be (B, 1, C) = ({b}, 1, {c}), got {tuple(t.shape)}")
    x, shift, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, shift, scale))
    out = torch.empty(b, length, c, device=x.device, dtype=x.dtype)
    block_c = triton.next_power_of_2(c)
    block_r = max(1, min(16, 4096 // block_c))  # ≈ 4K fp32 lanes per program
    grid = (triton.cdiv(length, block_r), b)
    _adaln_modulate_kernel[grid](
        x,
        shift,
        scale,
        out,
        x.stride(0),
        x.stride(1),
        shift.stride(0),
        scale.stride(0),
        out.stride(0),
        out.stride(1),
        length,
        c,
        eps,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=1 if interpreting() else (4 if block_c <= 2048 else 8),
    )
    return out
