"""Training configs: frozen dataclasses read from YAML, with ``--set key=value`` overrides.

``LoopConfig`` holds what the one training loop needs (optimiser, schedule, EMA, budget, logging, export).
``TrainConfig`` adds a stage's own settings (autoencoder, teacher, classifier); distillation's config
(training/distill/config.py) adds one nested section per method. Values keep the types their defaults declare,
so ``--set lr=3e-4`` is a float and ``--set consistency.grid_steps=16`` reaches a nested section. ``None`` means
"not set": inherit (the teacher's value, the loop's value) or "no limit", never a magic number.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fewstep.errors import UsageError
from fewstep.yamlfile import read_mapping


@dataclass(frozen=True)
class LoopConfig:
    """The training loop's settings; every stage and distillation method shares them."""

    out: str = "runs/digits-teacher"  # run dir: state.pt (resume), metrics.jsonl, export/
    name: str = "digits-teacher"  # the exported model's name
    data: str = "digits"  # digits (MNIST, downloaded once) | synthetic (tiny, no download; tests) | folder:PATH
    batch_size: int = 128  # global batch, split across DDP ranks
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr·min_lr_ratio at max_steps
    warmup_steps: int = 200
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    max_steps: int = 10_000
    max_minutes: float | None = None  # None: no wall-clock limit; else stop (and export) after this long
    grad_clip: float | None = 1.0  # None: no clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay = min(ema_decay, (1 + step) / (10 + step)) so early EMA is not stale
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 50
    ckpt_every: int = 500
    # every this many minutes of training, also export the EMA model to OUT/snapshots/step-N (then `fewstep eval`
    # each for a curve of quality against training time); None: only the final export
    snapshot_minutes: float | None = None
    export_dtype: str = "float16"  # float16 | float32 | bfloat16
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    # under torchrun: ddp (a replica per process) | fsdp (FSDP2: the trained model's blocks, gradients and optimizer
    # state sharded across the processes, for a student that does not fit one GPU: training/distributed.py)
    parallel: str = "ddp"

    def settings_record(self) -> dict[str, Any]:
        """What a card records beside the loop's settings: the stage's or the method's own settings."""
        return {}


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """``fewstep train``: the loop plus the stage's own settings."""

    stage: str = "teacher"  # autoencoder | teacher | classifier
    model: str = "digits"  # architecture variant (models/config.py)
    autoencoder: str | None = None  # teacher stage: checkpoint dir of a trained autoencoder
    caption_dropout: float = 0.1  # for classifier-free guidance
    t_logit_mean: float = 0.0  # logit-normal t (SD3, minRF): t = sigmoid(N(mean, std))
    t_logit_std: float = 1.0
    kl_weight: float = 1e-6  # autoencoder stage
    default_steps: int = 40  # teacher's default sampling steps, written to its card
    guidance: float = 3.0  # teacher's default CFG scale, written to its card
    schedule_shift: float = 1.0  # Flux time shift of the teacher's schedule (1 = uniform)

    def settings_record(self) -> dict[str, Any]:
        return own_settings(self)


LOOP_FIELDS = tuple(f.name for f in fields(LoopConfig))


def loop_settings(cfg: Any) -> dict[str, Any]:
    """The loop's part of a config, as a card records it."""
    return {k: plain(getattr(cfg, k)) for k in LOOP_FIELDS}


def own_settings(cfg: Any) -> dict[str, Any]:
    """A config's fields beyond the loop's (a stage's settings), as a card records them."""
    return {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg) if f.name not in LOOP_FIELDS}


def plain(value: Any) -> Any:
    """A config value as a card records it: sections as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return list(value) if isinstance(value, tuple) else value


def _coerce(kind: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(args[0], value, key)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise UsageError(f"{key}: expected a mapping of {kind.__name__} settings, got {value!r}")
        return build_config(kind, value, prefix=f"{key}.")
    if origin is tuple:
        if isinstance(value, str):
            items = value.split(",")
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]  # a scalar where a tuple is expected: a one-item tuple (student_steps: 4)
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in items)
        if len(items) != len(args):
            raise UsageError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, items, strict=True))
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}") from None


def build_config(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """``cls`` from a (nested) mapping; unknown keys and wrong types are UsageErrors naming the key."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"unknown config keys {[prefix + k for k in unknown]}; known: {sorted(known)}")
    return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in values.items()})


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``["lr=3e-4", "consistency.grid_steps=16"]`` -> ``{"lr": "3e-4", "consistency": {"grid_steps": "16"}}``."""
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {key.strip()}: {p} was set to a value, not a section")
        node[leaf] = value.strip()
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from(cls: type, values: dict[str, Any], sets: list[str] = ()) -> Any:
    """``values`` (a config file's mapping) with ``--set`` overrides on top, validated against ``cls``."""
    return build_config(cls, _merge(values, parse_sets(list(sets))))


def load_config(cls: type, path: str | Path | None, sets: list[str] = ()) -> Any:
    """YAML file (optional) then --set overrides, validated against the dataclass's fields and types."""
    return config_from(cls, read_mapping(path) if path is not None else {}, sets)
