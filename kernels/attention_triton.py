"""Flash-attention forward in Triton; ``attention_ref`` in attention.py defines the result.

FlashAttention-2's schedule (Dao 2023): one program owns BLOCK_M queries of one (batch, head), streams the
keys and values in BLOCK_N tiles and keeps a running max m, a running sum l and an fp32 accumulator, so
the L×L score matrix never exists. Scores use exp2 with log2(e) folded into the softmax scale.

What Flux-style models need beyond the Triton tutorial (kernels.md): any sequence length (tails masked on
load), a key-padding mask for padded text tokens, fp32 / fp16 / bf16 inputs, head_dim 16…256, arbitrary
input strides (v is a view into the qkv projection) and the output written straight into the
(B, L, H·D) layout the output projection reads, so no transpose follows. A query row whose keys are all
masked gets zeros (the reference's softmax would give NaN there).

Under TRITON_INTERPRET=1 bf16 tiles are multiplied in fp32 (the interpreter holds bf16 as raw uint16, so
its bf16 dot is wrong): the "cast path" the tests exercise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fewstep.kernels.runtime import interpreting

_LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    MASK,
    OUT,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_mb,
    stride_ob,
    stride_ol,
    H,
    LQ,
    LK,
    qk_scale,
    HAS_MASK: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
        mask=(offs_m < LQ)[:, None],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    # m starts finite: a tile whose keys are all masked then gives p = 0 and alpha = 1, never NaN
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, LK, BLOCK_N):
        offs_n = start + offs_n0
        in_range = offs_n < LK
        k = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None], mask=in_range[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=in_range[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        valid = in_range
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * stride_mb + offs_n, mask=in_range, other=0) != 0)
        s = tl.dot(q, k, input_precision=PRECISION)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # (BLOCK_M, BLOCK_N), log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = OUT + b * stride_ob + offs_m[:, None] * stride_ol + h * D + offs_d[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=(offs_m < LQ)[:, None])


def _gpu_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (128, 64, 4, 3),
            (64, 64, 4, 3),
            (128, 32, 4, 4),
            (64, 32, 4, 2),
        ]
    ]


_attn_fwd_tuned = triton.autotune(configs=_gpu_configs(), key=["LQ", "LK", "D", "HAS_MASK"])(_attn_fwd_kernel)


def attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Same contract as ``attention_ref``: q (B, H, Lq, D), k, v (B, H, Lk, D) -> (B, Lq, H·D)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if k.shape != (b, h, lk, d) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not match")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"the Triton attention needs a power-of-two head_dim in 16…256, got {d}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if key_mask is not None:
        if key_mask.shape != (b, lk):
            raise ValueError(f"key_mask must be (B, Lk) = ({b}, {lk}), got {tuple(key_mask.shape)}")
        mask = key_mask.to(torch.int8).contiguous()
    else:
        mask = torch.empty(1, dtype=torch.int8, device=q.device)
    out = torch.empty(b, lq, h * d, device=q.device, dtype=q.dtype)
    args = (
        q,
        k,
        v,
        mask,
        out,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        mask.stride(0),
        out.stride(0),
        out.stride(1),
        h,
        lq,
        lk,
        _LOG2E / math.sqrt(d),
    )
    # fp32 inputs get true fp32 products (as SDPA gives), not TF32; fp16/bf16 ignore the setting
    meta = {"HAS_MASK": key_mask is not None, "D": d, "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}
    if interpreting():
        # one small config: the interpreter runs programs one by one, and bf16 dots go through fp32
        block = 16 if max(lq, lk) <= 16 else 32
        grid = (triton.cdiv(lq, block), b * h)
        _attn_fwd_kernel[grid](*args, **meta, BLOCK_M=block, BLOCK_N=block, DOT_FP32=q.dtype == torch.bfloat16)
    else:
        grid = lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * h)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **meta, DOT_FP32=False)
    return out
