import math

import pytest
import torch

from fewstep.kernels.attention import attention_ref
from fewstep.kernels.modulation import adaln_modulate_ref
from fewstep.kernels.qk_norm_rope import qk_norm_rope_ref
from fewstep.models.config import ModelConfig, get_variant
from fewstep.models.flow import interpolate, shift_time, timesteps, velocity_target, x0_from_velocity
from fewstep.models.mmdit import MMDiT
from fewstep.models.rope import position_ids, rope_tables
from fewstep.models.text import TextEncoder, Tokenizer
from fewstep.training.data import caption_vocabulary
from tests.helpers import randomize


def test_rope_rotates_adjacent_pairs_by_position_times_frequency():
    ids = position_ids(n_txt=2, grid_h=2, grid_w=3)
    assert ids[:2].abs().sum() == 0  # text at position 0
    assert ids[2:].tolist()[4] == [0, 1, 1]  # row-major image grid
    axes = (2, 2, 4)
    cos, sin = rope_tables(ids, axes, theta=10_000)
    assert cos.shape == (8, 4) and cos.dtype == torch.float32
    # image token (0, 1, 2): col axis dims 4..7 -> pair 3 has freq 10000^(-2/4) = 0.01
    token = 2 + 1 * 3 + 2
    assert math.isclose(float(cos[token, 3]), math.cos(2 * 0.01), rel_tol=1e-6)
    assert math.isclose(float(sin[token, 2]), math.sin(2 * 1.0), rel_tol=1e-6)
    # apply to a head with one hot pairs: pair 3 of token must rotate (x0, x1) = (1, 0) to (cos, sin)
    qkv = torch.zeros(1, 8, 3 * 8)
    qkv[0, token, 6] = 1.0  # q, head 0, dim 6 = pair 3's first element
    q, _, _ = qk_norm_rope_ref(qkv, cos, sin, torch.ones(8), torch.ones(8), num_heads=1, eps=0.0)
    # RMSNorm of a one-hot of length 8 scales it to sqrt(8)
    expect = math.sqrt(8) * torch.tensor([math.cos(0.02), math.sin(0.02)])
    assert torch.allclose(q[0, 0, token, 6:8], expect, atol=1e-5)
    assert q[0, 0, token, :6].abs().max() == 0


def test_text_tokens_are_not_rotated():
    ids = position_ids(n_txt=3, grid_h=2, grid_w=2)
    cos, sin = rope_tables(ids, (4, 6, 6), 10_000)
    assert torch.equal(cos[:3], torch.ones(3, 8)) and torch.equal(sin[:3], torch.zeros(3, 8))


def test_qk_norm_uses_text_scales_for_text_tokens():
    b, length, h, d, n_txt = 2, 5, 2, 4, 2
    qkv = torch.randn(b, length, 3 * h * d, dtype=torch.float64)
    cos, sin = torch.ones(length, d // 2, dtype=torch.float64), torch.zeros(length, d // 2, dtype=torch.float64)
    s_img, s_txt = torch.full((d,), 2.0), torch.full((d,), 3.0)
    q, k, v = qk_norm_rope_ref(qkv, cos, sin, s_img, s_img, h, 1e-6, n_txt, s_txt, s_txt)
    raw_q = qkv[..., : h * d].view(b, length, h, d).transpose(1, 2)
    rms = raw_q.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
    assert torch.allclose(q[:, :, :n_txt], (raw_q * rms * 3.0)[:, :, :n_txt])
    assert torch.allclose(q[:, :, n_txt:], (raw_q * rms * 2.0)[:, :, n_txt:])
    assert torch.equal(v, qkv[..., 2 * h * d :].view(b, length, h, d).transpose(1, 2))


def test_attention_ignores_masked_keys_and_writes_token_major_layout():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    out = attention_ref(q, k, v, mask)
    assert out.shape == (2, 6, 12)
    # changing masked keys/values must not change anything
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 4:] += 5
    v2[0, :, 4:] -= 7
    assert torch.allclose(out, attention_ref(q, k2, v2, mask))
    # hand-computed softmax for sample 0, head 1
    s = (q[0, 1] @ k[0, 1, :4].T) / 2.0
    ref = torch.softmax(s, -1) @ v[0, 1, :4]
    assert torch.allclose(out[0, :, 4:8], ref)


def test_adaln_modulate():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    shift, scale = torch.randn(2, 1, 8, dtype=torch.float64), torch.randn(2, 1, 8, dtype=torch.float64)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-6) * (1 + scale) + shift
    assert torch.allclose(adaln_modulate_ref(x, shift, scale), ref, atol=1e-6)


@pytest.mark.parametrize("variant", ["tiny", "tiny-pixel", "digits"])
def test_mmdit_shapes_and_text_padding_is_ignored(variant):
    cfg: ModelConfig = get_variant(variant)
    model = MMDiT(cfg.transformer, cfg.text.dim, cfg.latent_size).eval()
    randomize(model)
    te = TextEncoder(cfg.text).eval()
    tok = Tokenizer(caption_vocabulary(), cfg.text.max_length)
    ids, mask = tok.encode(["a red 7 on black", "seven in red on a black background"])
    cond = te(ids, mask)
    x = torch.randn(2, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    t = torch.tensor([0.3, 0.9])
    out = model(x, t, cond.tokens, cond.mask, cond.pooled)
    assert out.shape == x.shape
    # whatever sits in padded text positions cannot reach the image
    junk = cond.tokens.clone()
    junk[~cond.mask] = 100.0
    assert torch.allclose(out, model(x, t, junk, cond.mask, cond.pooled), atol=1e-5)


def test_untrained_model_predicts_zero_velocity():
    cfg = get_variant("tiny")
    model = MMDiT(cfg.transformer, cfg.text.dim, cfg.latent_size)
    out = model(
        torch.randn(1, 4, 8, 8),
        torch.tensor([0.5]),
        torch.randn(1, 12, 16),
        torch.ones(1, 12, dtype=torch.bool),
        torch.randn(1, 16),
    )
    assert out.abs().max() == 0  # zero-initialised final layer (DiT): training starts from v = 0


def test_guidance_embedding_is_required_when_configured():
    cfg = get_variant("tiny")
    from dataclasses import replace

    tcfg = replace(cfg.transformer, guidance_embed=True)
    model = MMDiT(tcfg, cfg.text.dim, cfg.latent_size)
    args = (
        torch.randn(1, 4, 8, 8),
        torch.tensor([0.5]),
        torch.randn(1, 12, 16),
        torch.ones(1, 12, dtype=torch.bool),
        torch.randn(1, 16),
    )
    with pytest.raises(ValueError, match="guidance"):
        model(*args)
    assert model(*args, guidance=torch.tensor([4.0])).shape == (1, 4, 8, 8)


def test_flow_path_and_schedules():
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([0.0, 0.5, 1.0])
    xt = interpolate(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.5 * (x0[1] + eps[1]))
    v = velocity_target(x0, eps)
    assert torch.allclose(x0_from_velocity(xt, v, t), x0, atol=1e-6)
    assert timesteps(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = timesteps(4, "shifted", 3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and shifted[2] == pytest.approx(0.75)
    assert float(shift_time(torch.tensor(0.5), 1.0)) == 0.5
    with pytest.raises(ValueError):
        timesteps(0)
