"""Flux weights in fewstep's MMDiT, and back: diffusers' FluxTransformer2DModel <-> models/mmdit.py.

The two compute the same function (tests/models/test_flux.py checks it within 1e-5 in fp32); they differ only
in how the weights are laid out:

    diffusers                                         fewstep
    x_embedder, context_embedder                      img_in, txt_in
    time_text_embed.{timestep,text,guidance}_embedder time_in, vector_in, guidance_in  (linear_1/2 -> in/out_layer)
    transformer_blocks.i   norm1(_context).linear     double_blocks.i  img_mod.lin, txt_mod.lin
                           attn.to_q|to_k|to_v        img_attn.qkv     (concatenated along the output dim)
                           attn.add_q|k|v_proj        txt_attn.qkv
                           attn.norm_(added_)q|k      img_attn.norm, txt_attn.norm  (q_scale, k_scale)
                           attn.to_out.0, to_add_out  img_attn.proj, txt_attn.proj
                           ff(_context).net.0.proj|2  img_mlp.0|2, txt_mlp.0|2
    single_transformer_blocks.i  attn.to_q|k|v+proj_mlp  single_blocks.i linear1  (one fused linear, as in BFL's flux)
                           proj_out, norm.linear      linear2, modulation.lin
    norm_out.linear        (scale, shift)             final_layer.adaLN_modulation.1  (shift, scale: halves swapped)
    proj_out                                          final_layer.linear

diffusers' transformer takes latents packed 2×2 by FluxPipeline (in_channels = 4 × latent channels, its own
patch_size 1); fewstep packs inside the model with ``patch_size`` 2 in the same (C, ph, pw) order, so the
embedding weights are the same matrix. Every step here is a copy, a concatenation or a split: the round trip is
bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fewstep.errors import UsageError
from fewstep.models.config import TransformerConfig

CONFIG = "config.json"
# diffusers' Flux fixes these; a fewstep transformer with other values has no FluxTransformer2DModel equivalent
FLUX_FIXED = {"theta": 10_000, "mlp_ratio": 4.0, "qk_norm_eps": 1e-6, "guidance_factor": 1000.0}


class ConversionError(UsageError):
    """Weights or a config that cannot be converted; the message names the file, tensor or field."""


# ---- configs ----------------------------------------------------------------------------------------------
def config_from_diffusers(cfg: dict[str, Any], where: str = "config.json") -> TransformerConfig:
    """A FluxTransformer2DModel config.json -> the equivalent TransformerConfig (patch 2, as FluxPipeline packs)."""
    if cfg.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
        raise ConversionError(f"{where}: _class_name is {cfg['_class_name']!r}, not FluxTransformer2DModel")
    d = {**_FLUX_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    if d["patch_size"] != 1:
        raise ConversionError(f"{where}: patch_size {d['patch_size']} is not supported (FluxPipeline packs, so 1)")
    out = d.get("out_channels") or d["in_channels"]
    if out != d["in_channels"] or d["in_channels"] % 4:
        raise ConversionError(
            f"{where}: in_channels {d['in_channels']} / out_channels {out}: need equal and a multiple of 4 "
            "(latent channels packed 2×2)"
        )
    axes = tuple(int(a) for a in d["axes_dims_rope"])
    if sum(axes) != d["attention_head_dim"]:
        raise ConversionError(f"{where}: axes_dims_rope {axes} must sum to attention_head_dim")
    return TransformerConfig(
        in_channels=d["in_channels"] // 4,
        patch_size=2,
        hidden_size=d["num_attention_heads"] * d["attention_head_dim"],
        num_heads=d["num_attention_heads"],
        depth_double=d["num_layers"],
        depth_single=d["num_single_layers"],
        axes_dim=axes,
        guidance_embed=bool(d["guidance_embeds"]),
        context_dim=d["joint_attention_dim"],
        pooled_dim=d["pooled_projection_dim"],
        **FLUX_FIXED,
    )


_FLUX_DEFAULTS = {  # FluxTransformer2DModel's defaults: FLUX.1's shape
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}


def config_to_diffusers(cfg: TransformerConfig) -> dict[str, Any]:
    """TransformerConfig (text widths resolved: models/convert.py) -> FluxTransformer2DModel's keyword arguments."""
    for name, value in FLUX_FIXED.items():
        if name == "guidance_factor" and not cfg.guidance_embed:
            continue
        if getattr(cfg, name) != value:
            hint = " (saved before guidance_factor existed: retrain it)" if name == "guidance_factor" else ""
            raise ConversionError(
                f"{name} is {getattr(cfg, name)}; diffusers' FluxTransformer2DModel fixes it at {value}{hint}"
            )
    context, pooled = cfg.context_dim, cfg.pooled_dim
    if context is None or pooled is None:
        raise ConversionError("the text widths are unknown: the config has no context_dim/pooled_dim")
    return {
        "patch_size": 1,
        "in_channels": cfg.in_channels * cfg.patch_size**2,
        "out_channels": None,
        "num_layers": cfg.depth_double,
        "num_single_layers": cfg.depth_single,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": context,
        "pooled_projection_dim": pooled,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": list(cfg.axes_dim),
    }


# ---- weights ----------------------------------------------------------------------------------------------
def _rules(cfg: TransformerConfig) -> list[tuple[str, list[str]]]:
    """(fewstep module, [diffusers modules concatenated along the output dim]) for every linear/norm."""
    rules = [
        ("img_in", ["x_embedder"]),
        ("txt_in", ["context_embedder"]),
        ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"]),
        ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"]),
        ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"]),
        ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"]),
        ("final_layer.linear", ["proj_out"]),
    ]
    if cfg.guidance_embed:
        rules += [
            ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"]),
            ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"]),
        ]
    for i in range(cfg.depth_double):
        f, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        rules += [
            (f"{f}.img_mod.lin", [f"{d}.norm1.linear"]),
            (f"{f}.txt_mod.lin", [f"{d}.norm1_context.linear"]),
            (f"{f}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"]),
            (f"{f}.txt_attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"]),
            (f"{f}.img_attn.proj", [f"{d}.attn.to_out.0"]),
            (f"{f}.txt_attn.proj", [f"{d}.attn.to_add_out"]),
            (f"{f}.img_mlp.0", [f"{d}.ff.net.0.proj"]),
            (f"{f}.img_mlp.2", [f"{d}.ff.net.2"]),
            (f"{f}.txt_mlp.0", [f"{d}.ff_context.net.0.proj"]),
            (f"{f}.txt_mlp.2", [f"{d}.ff_context.net.2"]),
        ]
    for i in range(cfg.depth_single):
        f, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        rules += [
            (f"{f}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"]),
            (f"{f}.linear2", [f"{d}.proj_out"]),
            (f"{f}.modulation.lin", [f"{d}.norm.linear"]),
        ]
    return rules


def _norm_rules(cfg: TransformerConfig) -> list[tuple[str, str]]:
    """(fewstep parameter, diffusers parameter) for the QK RMSNorm scales."""
    rules = []
    for i in range(cfg.depth_double):
        f, d = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        rules += [
            (f"{f}.img_attn.norm.q_scale", f"{d}.norm_q.weight"),
            (f"{f}.img_attn.norm.k_scale", f"{d}.norm_k.weight"),
            (f"{f}.txt_attn.norm.q_scale", f"{d}.norm_added_q.weight"),
            (f"{f}.txt_attn.norm.k_scale", f"{d}.norm_added_k.weight"),
        ]
    for i in range(cfg.depth_single):
        f, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}.attn"
        rules += [(f"{f}.norm.q_scale", f"{d}.norm_q.weight"), (f"{f}.norm.k_scale", f"{d}.norm_k.weight")]
    return rules


_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) along the output dim: AdaLayerNormContinuous vs Flux's LastLayer."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _take(state: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    try:
        return state.pop(key)
    except KeyError:
        raise ConversionError(f"{where}: tensor {key!r} is missing") from None


def _no_leftovers(state: dict[str, torch.Tensor], where: str) -> None:
    if state:
        extra = sorted(state)
        raise ConversionError(f"{where}: unexpected tensors {extra[:3]}{'…' if len(extra) > 3 else ''}")


def state_from_diffusers(
    state: dict[str, torch.Tensor], cfg: TransformerConfig, where: str = "transformer"
) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict -> an MMDiT state dict for ``cfg`` (config_from_diffusers)."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    for mine, theirs in _rules(cfg):
        for p in ("weight", "bias"):
            out[f"{mine}.{p}"] = torch.cat([_take(state, f"{t}.{p}", where) for t in theirs], dim=0)
    for mine, theirs in _norm_rules(cfg):
        out[mine] = _take(state, theirs, where)
    for p in ("weight", "bias"):
        out[f"{_FINAL_MOD[0]}.{p}"] = _swap_halves(_take(state, f"{_FINAL_MOD[1]}.{p}", where))
    _no_leftovers(state, where)
    return out


def state_to_diffusers(
    state: dict[str, torch.Tensor], cfg: TransformerConfig, where: str = "transformer"
) -> dict[str, torch.Tensor]:
    """An MMDiT state dict -> a FluxTransformer2DModel state dict (the inverse of state_from_diffusers)."""
    state = dict(state)
    dim, mlp = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    out: dict[str, torch.Tensor] = {}
    for mine, theirs in _rules(cfg):
        for p in ("weight", "bias"):
            t = _take(state, f"{mine}.{p}", where)
            if len(theirs) == 1:
                out[f"{theirs[0]}.{p}"] = t
                continue
            sizes = [dim, dim, dim, mlp][: len(theirs)] if len(theirs) == 4 else [dim] * len(theirs)
            if t.shape[0] != sum(sizes):
                raise ConversionError(f"{where}: {mine}.{p} has {t.shape[0]} outputs, the config needs {sum(sizes)}")
            for name, part in zip(theirs, t.split(sizes, dim=0), strict=True):
                out[f"{name}.{p}"] = part.clone()
    for mine, theirs in _norm_rules(cfg):
        out[theirs] = _take(state, mine, where)
    for p in ("weight", "bias"):
        out[f"{_FINAL_MOD[1]}.{p}"] = _swap_halves(_take(state, f"{_FINAL_MOD[0]}.{p}", where))
    _no_leftovers(state, where)
    return out


# ---- folders ----------------------------------------------------------------------------------------------
def transformer_folder(path: str | Path) -> Path:
    """A FluxTransformer2DModel folder, or a FluxPipeline folder's transformer/ (one with model_index.json)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        path = path / "transformer"
    if not (path / CONFIG).is_file():
        raise ConversionError(f"{path}: no {CONFIG} (not a diffusers transformer or pipeline folder)")
    return path


def read_diffusers_transformer(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict) of a diffusers transformer folder: one safetensors file or an indexed set of shards."""
    path = transformer_folder(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path / CONFIG}: not valid JSON ({e})") from None
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        try:
            shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ConversionError(f"{index[0]}: not a safetensors index ({e})") from None
    else:
        shards = [p.name for p in sorted(path.glob("*.safetensors"))]
        if len(shards) != 1:
            raise ConversionError(f"{path}: expected one .safetensors file (or an index), found {len(shards)}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            state.update(load_file(str(path / shard)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{path / shard}: not a readable safetensors file ({e})") from None
    return config, state


def mmdit_state_from_folder(path: str | Path) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """A diffusers Flux transformer (or pipeline) folder as fewstep's (TransformerConfig, MMDiT state dict)."""
    folder = transformer_folder(path)
    config, state = read_diffusers_transformer(folder)
    cfg = config_from_diffusers(config, str(folder / CONFIG))
    return cfg, state_from_diffusers(state, cfg, str(folder))


def write_diffusers_transformer(
    out: str | Path, cfg: TransformerConfig, state: dict[str, torch.Tensor], overwrite: bool
) -> Path:
    """Write a FluxTransformer2DModel folder that ``FluxTransformer2DModel.from_pretrained(out)`` loads.

    Never overwrites a non-empty folder unless asked; written into ``.NAME.new`` beside it and renamed into place,
    so a crash leaves the old folder or the new one, never half of one.
    """
    from diffusers import FluxTransformer2DModel

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConversionError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    kwargs = config_to_diffusers(cfg)
    theirs = state_to_diffusers(state, cfg)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**kwargs)
    missing = set(model.state_dict()) ^ set(theirs)
    if missing:  # a bug in the rules, not a user error
        raise RuntimeError(f"conversion rules and FluxTransformer2DModel disagree on {sorted(missing)[:3]}")
    model.load_state_dict(theirs, assign=True, strict=True)
    staging = out.parent / f".{out.name}.new"
    if staging.exists():
        shutil.rmtree(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging, safe_serialization=True)
    old = out.parent / f".{out.name}.old"
    _remove(old)  # a crash's leftover
    if out.exists():
        os.rename(out, old)
    os.rename(staging, out)
    _remove(old)
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def describe(cfg: TransformerConfig) -> dict[str, Any]:
    """The config as a card stores it (lists, not tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
