from __future__ import annotations

import pytest
import torch

from fewstep.kernels.modulation import adaln_modulate_ref
from fewstep.kernels.modulation_triton import adaln_modulate_triton
from tests.kernels.helpers import DTYPES, assert_close


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [96, 256])  # 96: not a power of two, so the row tail is masked
def test_adaln_modulate_matches_float64_reference(channels, dtype):
    g = torch.Generator().manual_seed(channels)
    b, length = 3, 71
    x = (torch.randn(b, length, channels, generator=g) * 4 + 1).to(dtype)
    mod = torch.randn(b, 1, 6 * channels, generator=g).to(dtype)  # the model's (B, 1, 6C) modulation output
    shift, scale = mod[..., :channels], mod[..., channels : 2 * channels]  # strided chunks, as in the blocks
    out = adaln_modulate_triton(x, shift, scale)
    ref = adaln_modulate_ref(x.double(), shift.double(), scale.double())
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"adaln C={channels} {dtype}")


def test_each_sample_gets_its_own_shift_and_scale():
    x = torch.randn(2, 5, 64).expand(2, 5, 64).clone()
    x[1] = x[0]
    shift = torch.stack([torch.zeros(1, 64), torch.ones(1, 64)])
    scale = torch.zeros(2, 1, 64)
    out = adaln_modulate_triton(x, shift, scale)
    torch.testing.assert_close(out[1] - out[0], torch.ones(5, 64))
