"""Training configs: a frozen dataclass read from YAML, with ``--set key=value`` overrides.

One config type covers every stage (autoencoder, teacher, classifier); distillation recipes extend it in
training/distill/. Values keep the types their defaults declare, so ``--set lr=3e-4`` is a float.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fewstep.yamlfile import read_mapping


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "teacher"  # autoencoder | teacher | classifier
    model: str = "digits"  # architecture variant (models/config.py)
    autoencoder: str | None = None  # teacher stage: checkpoint dir of a trained autoencoder
    out: str = "runs/digits-teacher"  # run dir: state.pt (resume), metrics.jsonl, export/
    name: str = "digits-teacher"  # the exported model's name
    data: str = "digits"  # digits (MNIST, downloaded once) | synthetic (tiny, no download; tests)
    batch_size: int = 128  # global batch, split across DDP ranks
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr·min_lr_ratio at max_steps
    warmup_steps: int = 200
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    max_steps: int = 10_000
    max_minutes: float = 0.0  # 0 = no wall-clock limit; otherwise stop (and export) after this long
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay = min(ema_decay, (1 + step) / (10 + step)) so early EMA is not stale
    caption_dropout: float = 0.1  # for classifier-free guidance
    t_logit_mean: float = 0.0  # logit-normal t (SD3, minRF): t = sigmoid(N(mean, std))
    t_logit_std: float = 1.0
    kl_weight: float = 1e-6  # autoencoder stage
    default_steps: int = 40  # teacher's default sampling steps, written to its card
    guidance: float = 3.0  # teacher's default CFG scale, written to its card
    schedule_shift: float = 1.0  # Flux time shift of the teacher's schedule (1 = uniform)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 50
    ckpt_every: int = 500
    export_dtype: str = "float16"  # float16 | float32 | bfloat16
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default


def _coerce(kind: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(args[0], value, key)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(a, v, key) for a, v in zip(typing.get_args(kind), items, strict=True))
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}") from None


def build_config(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
    return cls(**{k: _coerce(hints[k], v, k) for k, v in values.items()})


def parse_sets(sets: list[str]) -> dict[str, str]:
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def load_config(cls: type, path: str | Path | None, sets: list[str] = ()) -> Any:
    """YAML file (optional) then --set overrides, validated against the dataclass's fields and types."""
    values: dict[str, Any] = read_mapping(path) if path is not None else {}
    values.update(parse_sets(list(sets)))
    return build_config(cls, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)

