"""Fused per-head QK RMSNorm + RoPE in Triton; ``qk_norm_rope_ref`` in qk_norm_rope.py defines the result.

One program normalises and rotates a tile of BLOCK_L tokens × one head of q *and* k, reading them straight
out of the fused qkv projection's output through its strides (in a single-stream block that output is a
slice of linear1's, so it is not even contiguous) and writing (B, H, L, D) tensors, the layout the attention
kernel reads. v is returned as a strided view: nothing to compute, nothing to copy.

Flux's RoPE rotates adjacent pairs (x[2j], x[2j+1]) (kernels.md): the kernel loads the even and the odd
lanes of a head as two (BLOCK_L, D/2) tiles, so the rotation is four multiplies with no shuffles, and the
RMS over D is the sum of both tiles' squares. Statistics and rotation run in fp32; stores cast back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from einops import rearrange

from fewstep.kernels.runtime import interpreting


@triton.jit
def _qk_norm_rope_kernel(
    QKV,
    COS,
    SIN,
    QS,
    KS,
    QS_TXT,
    KS_TXT,
    Q_OUT,
    K_OUT,
    stride_b,
    stride_l,  # qkv strides (elements); its last dim is contiguous
    stride_ob,
    stride_oh,
    stride_ol,  # output strides, shared by q and k
    stride_cl,  # cos / sin row stride
    L,
    N_TXT,
    H,
    eps,
    D: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_l, head, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # token indices
    j = tl.arange(0, HALF)  # pair index
    row_ok = rows < L
    tile_ok = row_ok[:, None]

    cos = tl.load(COS + rows[:, None] * stride_cl + j[None, :], mask=tile_ok, other=1.0)
    sin = tl.load(SIN + rows[:, None] * stride_cl + j[None, :], mask=tile_ok, other=0.0)
    is_txt = (rows < N_TXT)[:, None]

    base = QKV + b * stride_b + rows[:, None] * stride_l + head * D  # q of this head; k is H·D further
    out_off = b * stride_ob + head * stride_oh + rows[:, None] * stride_ol
    for which in tl.static_range(2):  # 0 = q, 1 = k
        src = base + which * H * D
        even = tl.load(src + 2 * j[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        odd = tl.load(src + 2 * j[None, :] + 1, mask=tile_ok, other=0.0).to(tl.float32)
        if which == 0:
            w_img, w_txt = QS, QS_TXT
        else:
            w_img, w_txt = KS, KS_TXT
        # per-token scales: the text tokens of a double-stream block use the text stream's weights
        w_even = tl.where(is_txt, tl.load(w_txt + 2 * j)[None, :], tl.load(w_img + 2 * j)[None, :]).to(tl.float32)
        w_odd = tl.where(is_txt, tl.load(w_txt + 2 * j + 1)[None, :], tl.load(w_img + 2 * j + 1)[None, :]).to(
            tl.float32
        )
        ms = (tl.sum(even * even, axis=1) + tl.sum(odd * odd, axis=1)) / D
        inv = 1.0 / tl.sqrt(ms + eps)
        even = even * inv[:, None] * w_even
        odd = odd * inv[:, None] * w_odd
        out_even = even * cos - odd * sin
        out_odd = even * sin + odd * cos
        dst = (Q_OUT if which == 0 else K_OUT) + out_off
        tl.store(dst + 2 * j[None, :], out_even.to(dst.dtype.element_ty), mask=tile_ok)
        tl.store(dst + 2 * j[None, :] + 1, out_odd.to(dst.dtype.element_ty), mask=tile_ok)


def qk_norm_rope_triton(
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
    """Same contract as ``qk_norm_rope_ref``: qkv (B, L, 3·H·D) -> q, k, v (B, H, L, D) in qkv's dtype."""
    b, length, width = qkv.shape
    d = width // (3 * num_heads)
    if width != 3 * num_heads * d:
        raise ValueError(f"qkv width {width} is not 3 × {num_heads} heads × a head_dim")
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Triton qk_norm_rope needs a power-of-two head_dim ≥ 16, got {d}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if cos.shape != (length, d // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be (L, D/2) = ({length}, {d // 2}), got {tuple(cos.shape)}")
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    scales = [s.contiguous() for s in (q_scale, k_scale)]
    txt_scales = [q_scale_txt, k_scale_txt] if q_scale_txt is not None and n_txt > 0 else scales
    txt_scales = [s.contiguous() for s in txt_scales]
    q = torch.empty(b, num_heads, length, d, device=qkv.device, dtype=qkv.dtype)
    k = torch.empty_like(q)
    # a GPU: ≈ 8K fp32 lanes per tile; the interpreter pays per program and per op, not per lane: one tile
    block_l = min(128, triton.next_power_of_2(length)) if interpreting() else max(1, min(64, 8192 // d))
    grid = (triton.cdiv(length, block_l), num_heads, b)
    _qk_norm_rope_kernel[grid](
        qkv,
        cos,
        sin,
        scales[0],
        scales[1],
        txt_scales[0],
        txt_scales[1],
        q,
        k,
        qkv.stride(0),
        qkv.stride(1),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        cos.stride(0),
        length,
        n_txt,
        num_heads,
        eps,
        D=d,
        HALF=d // 2,
        BLOCK_L=block_l,
        num_warps=4,
    )
    v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=num_heads)[2]  # a view into qkv
    return q, k, v
