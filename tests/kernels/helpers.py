"""Kernel tests: Triton kernels on CPU tensors through TRITON_INTERPRET=1 (set in tests/conftest.py).

Every kernel is compared with its PyTorch reference evaluated in float64 on the same (rounded) inputs, with
a tolerance per input dtype: the kernels compute in fp32 and round their output once to the input dtype.
"""

from __future__ import annotations

import torch

# max |kernel − reference| / max |reference|: fp32 is limited by fp32 arithmetic, fp16/bf16 by one rounding
# of the output (2^-11 and 2^-8 relative) plus fp16 products in the attention's dots
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 128]
AXES = {32: (8, 12, 12), 64: (16, 24, 24), 128: (16, 56, 56)}  # RoPE axes (index, row, col) summing to D


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"
