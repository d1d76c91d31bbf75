from __future__ import annotations

import pytest
import torch

from fewstep.kernels.qk_norm_rope import qk_norm_rope_ref
from fewstep.kernels.qk_norm_rope_triton import qk_norm_rope_triton
from fewstep.models.rope import position_ids, rope_tables
from tests.kernels.helpers import AXES, DTYPES, HEAD_DIMS, assert_close

N_TXT, GRID = 7, 8  # 7 text + 64 image tokens


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_qk_norm_rope_matches_float64_reference(head_dim, dtype):
    g = torch.Generator().manual_seed(head_dim)
    b, h = 3, 2
    length = N_TXT + GRID * GRID
    # qkv as a single-stream block makes it: a slice of linear1's wider output, so rows are strided
    wide = torch.randn(b, length, 3 * h * head_dim + 40, generator=g) * 3
    qkv = wide[..., : 3 * h * head_dim].to(dtype)
    cos, sin = rope_tables(position_ids(N_TXT, GRID, GRID), AXES[head_dim], 10_000)
    qs, ks, qt, kt = (torch.rand(head_dim, generator=g) + 0.5 for _ in range(4))  # image and text scales
    q, k, v = qk_norm_rope_triton(qkv, cos, sin, qs, ks, h, 1e-6, N_TXT, qt, kt)
    rq, rk, rv = qk_norm_rope_ref(
        qkv.double(), cos.double(), sin.double(), qs.double(), ks.double(), h, 1e-6, N_TXT, qt.double(), kt.double()
    )
    assert q.dtype == k.dtype == v.dtype == dtype
    assert_close(q, rq, dtype, f"q D={head_dim} {dtype}")
    assert_close(k, rk, dtype, f"k D={head_dim} {dtype}")
    assert torch.equal(v, rv.to(dtype))
    assert v.data_ptr() == qkv.data_ptr() + 2 * h * head_dim * qkv.element_size()  # v is a view, not a copy


def test_text_tokens_use_their_own_scales():
    """Swapping the text scales changes the text rows only; without text scales every row uses the image's."""
    g = torch.Generator().manual_seed(0)
    h, d, length = 2, 32, N_TXT + 16
    qkv = torch.randn(1, length, 3 * h * d, generator=g)
    cos, sin = rope_tables(position_ids(N_TXT, 4, 4), AXES[d], 10_000)
    one, two = torch.ones(d), torch.full((d,), 2.0)
    q1, _, _ = qk_norm_rope_triton(qkv, cos, sin, one, one, h, 1e-6, N_TXT, two, two)
    q2, _, _ = qk_norm_rope_triton(qkv, cos, sin, one, one, h, 1e-6, 0)
    torch.testing.assert_close(q1[:, :, :N_TXT], 2 * q2[:, :, :N_TXT])
    torch.testing.assert_close(q1[:, :, N_TXT:], q2[:, :, N_TXT:])
