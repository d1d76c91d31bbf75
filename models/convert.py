"""``fewstep convert``: a diffusers Flux transformer <-> a fewstep checkpoint (the mapping is models/flux.py).

    fewstep convert --from-diffusers FLUX.1-dev/ --out flux-dev-fewstep/    (a pipeline or transformer folder)
    fewstep convert --to-diffusers zoo/digits-reflow-2rf --out reflow-flux/ (any fewstep MMDiT: a student too)

A converted Flux transformer is a checkpoint of role "transformer": its MMDiT weights in the source dtype and a
card whose ``model.transformer`` is the TransformerConfig. Both directions are exact copies of the weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from fewstep.models.checkpoint import DTYPES, Card, CheckpointError, load_weights, read_card, save_checkpoint
from fewstep.models.config import ModelConfig, TransformerConfig, config_from_dict
from fewstep.models.flux import (
    ConversionError,
    describe,
    mmdit_state_from_folder,
    transformer_folder,
    write_diffusers_transformer,
)
from fewstep.models.mmdit import MMDiT

TRANSFORMER = "transformer.safetensors"


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    kinds = {t.dtype for t in state.values() if t.is_floating_point()}
    names = [name for name, dt in DTYPES.items() if dt in kinds]
    if len(names) != 1:
        raise ConversionError(f"weights in {sorted(map(str, kinds))}: one of {sorted(DTYPES)} expected")
    return names[0]


def from_diffusers(source: str | Path, out: str | Path, overwrite: bool = False) -> Card:
    """A FluxTransformer2DModel (or FluxPipeline) folder -> a fewstep checkpoint of role "transformer"."""
    folder = transformer_folder(source)
    cfg, state = mmdit_state_from_folder(folder)
    out = Path(out)
    card = {
        "name": out.name,
        "role": "transformer",
        "model": {"transformer": describe(cfg)},
        "data": {"converted_from": str(folder.resolve()), "format": "diffusers FluxTransformer2DModel"},
    }
    weights = {TRANSFORMER: MMDiT.from_state(cfg, state)}
    return save_checkpoint(out, card, weights, dtype=_dtype_name(state), overwrite=overwrite)


def transformer_config(card: Card, where: str) -> TransformerConfig:
    """The TransformerConfig of a checkpoint that holds an MMDiT, its text widths resolved (a fewstep text-to-image
    model's are its text encoder's)."""
    try:
        if card.role == "transformer":
            return config_from_dict(TransformerConfig, card.model["transformer"])
        if card.role in ("teacher", "student"):
            from fewstep.models.pipeline import with_legacy_defaults

            config = ModelConfig.from_dict(with_legacy_defaults(card.model))
            tf, dim = config.transformer, config.text.dim
            return replace(tf, context_dim=tf.context_dim or dim, pooled_dim=tf.pooled_dim or dim)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: model: {e}") from None
    raise ConversionError(f"{where}: role {card.role!r} holds no transformer")


def load_transformer(directory: str | Path, device: str | torch.device = "cpu") -> MMDiT:
    """The MMDiT of any checkpoint that holds one (role transformer, teacher or student), verified."""
    directory = Path(directory)
    card = read_card(directory)
    model = MMDiT.from_state(transformer_config(card, str(directory / "card.json")), device="cpu")
    load_weights(directory, card, TRANSFORMER, model)
    return model.to(device).eval().requires_grad_(False)


def to_diffusers(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Any fewstep checkpoint holding an MMDiT -> a folder ``FluxTransformer2DModel.from_pretrained`` loads.

    The weights are copied exactly, in the dtype they were saved in. A consistency student's boundary scaling
    (c_skip, c_out) lives in its sampler, not its transformer: the exported model predicts its raw output.
    """
    from safetensors.torch import load_file

    from fewstep.models.checkpoint import verify_file

    source = Path(source)
    card = read_card(source)
    cfg = transformer_config(card, str(source / "card.json"))
    state = load_file(str(verify_file(source, card, TRANSFORMER)))
    expected = MMDiT.from_state(cfg).state_dict()
    for key, t in expected.items():
        if key not in state or state[key].shape != t.shape:
            got = tuple(state[key].shape) if key in state else "missing"
            raise CheckpointError(f"{source / TRANSFORMER}: {key}: {got}, the architecture needs {tuple(t.shape)}")
    return write_diffusers_transformer(out, cfg, state, overwrite)
