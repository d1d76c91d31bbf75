"""Flux weights in fewstep's MMDiT: the same function as diffusers' FluxTransformer2DModel, and exact conversion.

Tiny random transformers shaped like diffusers' own Flux tests, with and without the guidance embedding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from fewstep.cli import main
from fewstep.models.checkpoint import read_card
from fewstep.models.config import TransformerConfig
from fewstep.models.convert import load_transformer
from fewstep.models.flux import (
    ConversionError,
    config_from_diffusers,
    config_to_diffusers,
    state_from_diffusers,
    state_to_diffusers,
)
from fewstep.models.mmdit import MMDiT

ZOO = Path(__file__).resolve().parents[2] / "zoo"
TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,  # unlike the text tokens' 32: the two widths are separate
    axes_dims_rope=(4, 4, 8),
)


def tiny_flux(guidance: bool, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY, guidance_embeds=guidance).eval()
    with torch.no_grad():  # every weight random: zero-initialised layers would hide a wrong mapping
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def as_fewstep(theirs: FluxTransformer2DModel) -> MMDiT:
    cfg = config_from_diffusers(dict(theirs.config))
    mine = MMDiT(cfg, 0, 8).eval()
    mine.load_state_dict(state_from_diffusers(theirs.state_dict(), cfg), strict=True)
    return mine


def inputs(guidance: bool, batch: int = 2, h: int = 4, w: int = 6, n_txt: int = 7):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, 2 * h, 2 * w, generator=g)  # 4 channels, packed 2×2 into 16
    return dict(
        latents=latents,
        packed=FluxPipeline._pack_latents(latents, batch, 4, 2 * h, 2 * w),
        txt=torch.randn(batch, n_txt, 32, generator=g),
        pooled=torch.randn(batch, 24, generator=g),
        t=torch.tensor([0.93, 0.25][:batch]),
        guidance=torch.tensor([3.5, 1.5][:batch]) if guidance else None,
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, h, w, "cpu", torch.float32),
        txt_ids=torch.zeros(n_txt, 3),
        grid=(h, w),
    )


@pytest.mark.parametrize("guidance", [False, True])
def test_forward_equals_diffusers(guidance):
    theirs = tiny_flux(guidance)
    mine = as_fewstep(theirs)
    x = inputs(guidance)
    with torch.no_grad():
        ref = theirs(
            hidden_states=x["packed"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["pooled"],
            timestep=x["t"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
            return_dict=False,
        )[0]
        tokens = mine.forward_tokens(x["packed"], x["grid"], x["t"], x["txt"], None, x["pooled"], x["guidance"])
        # the latent-shaped forward packs inside the model the way FluxPipeline packs outside it
        unpacked = mine(x["latents"], x["t"], x["txt"], None, x["pooled"], x["guidance"])
    assert ref.abs().mean() > 0.1  # a real signal, not zeros
    assert (tokens - ref).abs().max() < 1e-5
    repacked = FluxPipeline._pack_latents(unpacked, 2, 4, 8, 12)
    assert (repacked - ref).abs().max() < 1e-5


def test_guidance_embedding_scales_by_1000_as_flux_dev():
    """The scale enters the sinusoid ×1000 (FLUX.1-dev), so w = 3.5 and w = 3.6 are far apart in embedding space."""
    theirs = tiny_flux(True)
    mine = as_fewstep(theirs)
    assert mine.cfg.guidance_factor == 1000.0
    x = inputs(True, batch=1)
    with torch.no_grad():
        a, b = (
            mine.forward_tokens(x["packed"], x["grid"], x["t"], x["txt"], None, x["pooled"], torch.tensor([w]))
            for w in (3.5, 3.6)
        )
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("guidance", [False, True])
def test_state_round_trips_bit_exactly(guidance):
    theirs = tiny_flux(guidance)
    cfg = config_from_diffusers(dict(theirs.config))
    state = {k: v.to(torch.bfloat16) for k, v in theirs.state_dict().items()}
    back = state_to_diffusers(state_from_diffusers(state, cfg), cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == torch.bfloat16 for k in state)
    assert config_to_diffusers(cfg) == {**TINY, "axes_dims_rope": [4, 4, 8], "out_channels": None,
                                        "guidance_embeds": guidance}  # fmt: skip


def test_convert_cli_both_ways_from_a_pipeline_folder(tmp_path):
    theirs = tiny_flux(True)
    pipe_dir = tmp_path / "FLUX.1-dev"
    theirs.save_pretrained(pipe_dir / "transformer")
    (pipe_dir / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))

    assert main(["convert", "--from-diffusers", str(pipe_dir), "--out", str(tmp_path / "dev-fewstep")]) == 0
    card = read_card(tmp_path / "dev-fewstep")
    assert card.role == "transformer" and card.model["transformer"]["context_dim"] == 32
    mine = load_transformer(tmp_path / "dev-fewstep")
    assert mine.cfg == config_from_diffusers(dict(theirs.config))

    assert main(["convert", "--to-diffusers", str(tmp_path / "dev-fewstep"), "--out", str(tmp_path / "back")]) == 0
    back = FluxTransformer2DModel.from_pretrained(tmp_path / "back")
    ours, again = theirs.state_dict(), back.state_dict()
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
    assert back.config.guidance_embeds and back.config.pooled_projection_dim == 24


def test_a_fewstep_student_exports_to_diffusers(tmp_path):
    """The shipped reflow student (trained by fewstep: patch 2, its text encoder's widths) runs alike in diffusers."""
    student = ZOO / "digits-reflow-2rf"
    assert main(["convert", "--to-diffusers", str(student), "--out", str(tmp_path / "flux")]) == 0
    mine = load_transformer(student)
    theirs = FluxTransformer2DModel.from_pretrained(tmp_path / "flux").float()
    c, n_txt, width = mine.cfg.in_channels, 12, mine.cfg.context_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, 8, 8, generator=g)
    txt, pooled = torch.randn(2, n_txt, width, generator=g), torch.randn(2, width, generator=g)
    t = torch.tensor([0.5, 1.0])
    with torch.no_grad():
        v = mine.float()(x, t, txt, None, pooled)
        ref = theirs(
            hidden_states=FluxPipeline._pack_latents(x, 2, c, 8, 8),
            encoder_hidden_states=txt,
            pooled_projections=pooled,
            timestep=t,
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
            txt_ids=torch.zeros(n_txt, 3),
            return_dict=False,
        )[0]
    assert ref.abs().mean() > 0.1
    assert (FluxPipeline._pack_latents(v, 2, c, 8, 8) - ref).abs().max() < 1e-5


def test_a_student_saved_before_guidance_factor_is_refused_with_the_reason(tmp_path, capsys):
    """A card saved before FLUX.1-dev's ×1000 guidance factor was adopted (no guidance_factor: the student embeds
    w×1, as zoo/digits-consistency did until issue 15) has no exact export."""
    import json
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(ZOO / "digits-consistency", legacy)
    card = json.loads((legacy / "card.json").read_text())
    del card["model"]["transformer"]["guidance_factor"]
    (legacy / "card.json").write_text(json.dumps(card))
    assert main(["convert", "--to-diffusers", str(legacy), "--out", str(tmp_path / "x")]) == 2
    assert "guidance_factor is 1.0" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---- what cannot be converted: one clear error each ---------------------------------------------------------
def test_missing_and_unexpected_tensors_are_named():
    theirs = tiny_flux(False)
    cfg = config_from_diffusers(dict(theirs.config))
    state = theirs.state_dict()
    with pytest.raises(ConversionError, match="'transformer_blocks.0.attn.to_k.weight' is missing"):
        state_from_diffusers({k: v for k, v in state.items() if k != "transformer_blocks.0.attn.to_k.weight"}, cfg)
    with pytest.raises(ConversionError, match="unexpected tensors.*lora"):
        state_from_diffusers({**state, "lora.weight": torch.zeros(1)}, cfg)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"in_channels": 6}, "multiple of 4"),
        ({"out_channels": 8}, "need equal"),
        ({"axes_dims_rope": [4, 4, 4]}, "must sum to attention_head_dim"),
        ({"patch_size": 2}, "patch_size 2"),
        ({"_class_name": "SD3Transformer2DModel"}, "not FluxTransformer2DModel"),
    ],
)
def test_configs_diffusers_flux_cannot_be_read_are_refused(change, message):
    with pytest.raises(ConversionError, match=message):
        config_from_diffusers({**TINY, **change})


def test_export_refuses_what_diffusers_flux_cannot_express(tmp_path):
    old_student = TransformerConfig(guidance_embed=True, guidance_factor=1.0, context_dim=32, pooled_dim=32)
    with pytest.raises(ConversionError, match="guidance_factor is 1.0.*retrain"):
        config_to_diffusers(old_student)
    with pytest.raises(ConversionError, match="mlp_ratio"):
        config_to_diffusers(TransformerConfig(mlp_ratio=2.0, context_dim=32, pooled_dim=32))


def test_convert_never_overwrites_and_names_bad_folders(tmp_path, tiny_teacher, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["convert", "--to-diffusers", str(tiny_teacher), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    assert main(["convert", "--from-diffusers", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_in_bf16_the_adapter_embeds_t_and_guidance_as_diffusers_rounds_them():
    """FluxTransformer2DModel computes 1000·t and 1000·w in bf16 (0.75 -> 752, 3.5 -> 3504): the adapter that
    serves FluxPipeline does the same, so a bf16 image is FluxPipeline's (fp32 embedding differs by ~1× std)."""
    from fewstep.models.flux_adapter import FluxMMDiT

    theirs = tiny_flux(True).to(torch.bfloat16)
    mine = FluxMMDiT(as_fewstep(tiny_flux(True)).to(torch.bfloat16))
    x = inputs(True, batch=1)
    kw = dict(hidden_states=x["packed"].bfloat16(), encoder_hidden_states=x["txt"].bfloat16(),
              pooled_projections=x["pooled"].bfloat16(), timestep=torch.tensor([0.75]), img_ids=x["img_ids"],
              txt_ids=x["txt_ids"], guidance=torch.tensor([3.5]), return_dict=False)  # fmt: skip
    with torch.no_grad():
        ref, out = theirs(**kw)[0].float(), mine(**kw)[0].float()
    assert (out - ref).abs().max() < 0.1 * ref.std()
