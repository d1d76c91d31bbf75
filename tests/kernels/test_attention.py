from __future__ import annotations

import pytest
import torch

from fewstep.kernels.attention import attention_ref
from fewstep.kernels.attention_triton import attention_triton
from tests.kernels.helpers import DTYPES, HEAD_DIMS, assert_close

N_TXT, N_IMG = 7, 64  # odd lengths: 71 tokens is no multiple of any block size


def masks(batch: int, length: int) -> torch.Tensor:
    """Per-sample key-padding masks of different lengths over the text tokens (True = attend)."""
    m = torch.ones(batch, length, dtype=torch.bool)
    for i in range(batch):
        m[i, N_TXT - i : N_TXT] = False  # sample 0 keeps every text token, sample 2 drops two
    return m


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention_matches_float64_reference(head_dim, dtype):
    g = torch.Generator().manual_seed(head_dim)
    b, h, length = 3, 2, N_TXT + N_IMG
    q, k, v = (torch.randn(b, h, length, head_dim, generator=g).to(dtype) for _ in range(3))
    mask = masks(b, length)
    out = attention_triton(q, k, v, mask)
    ref = attention_ref(q.double(), k.double(), v.double(), mask)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"attention D={head_dim} {dtype}")


def test_attention_reads_strided_views_and_no_mask():
    """q from a (B, L, H, D) buffer transposed, v a slice of a wider buffer: strides, not copies, and no mask."""
    g = torch.Generator().manual_seed(1)
    b, h, length, d = 2, 3, 19, 32
    q = torch.randn(b, length, h, d, generator=g).transpose(1, 2)
    k = torch.randn(b, h, length, d, generator=g)
    v = torch.randn(b, h, length, 2 * d, generator=g)[..., :d]
    out = attention_triton(q, k, v, None)
    assert_close(out, attention_ref(q.double(), k.double(), v.double(), None), torch.float32, "strided")


def test_masked_keys_do_not_contribute():
    """Changing a masked key's value must not change any output (it would, were the mask ignored)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 23, 32, generator=g) for _ in range(3))
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[:, 3:5] = False
    v2 = v.clone()
    v2[:, :, 3:5] = 1e3
    assert torch.equal(attention_triton(q, k, v, mask), attention_triton(q, k, v2, mask))


def test_attention_rejects_what_it_cannot_run():
    q = torch.randn(1, 1, 8, 48)
    with pytest.raises(ValueError, match="head_dim"):
        attention_triton(q, q, q)
    q = torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="key_mask"):
        attention_triton(q, q, q, torch.ones(1, 9, dtype=torch.bool))
