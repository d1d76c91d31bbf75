"""Where fewstep finds the models it serves, samples and evaluates, and where it keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

from fewstep.errors import UsageError

MODELS_ENV = "FEWSTEP_MODELS"
HOW = "pass --models DIR, set FEWSTEP_MODELS=DIR, or run from a fewstep checkout, whose ./zoo holds the shipped models"


def models_dir(explicit: str | Path | None = None) -> Path:
    """The models directory: ``explicit`` (--models), else $FEWSTEP_MODELS, else ./zoo.

    A missing directory is a UsageError saying where it looked and how to point elsewhere.
    """
    if explicit:
        path, source = Path(explicit), "--models"
    elif os.environ.get(MODELS_ENV):
        path, source = Path(os.environ[MODELS_ENV]), MODELS_ENV
    else:
        path, source = Path("zoo"), "the default ./zoo"
    if not path.is_dir():
        raise UsageError(f"no models directory at {path} ({source}): {HOW}")
    return path


def resolve_model(name_or_path: str | Path | None, default: str, models: str | Path | None = None) -> Path:
    """A checkpoint directory: a path that exists, else a name inside the models directory (``default`` if None)."""
    if name_or_path is not None and Path(name_or_path).is_dir():
        return Path(name_or_path)
    name = str(name_or_path) if name_or_path is not None else default
    if name_or_path is not None and ("/" in name or os.sep in name):
        raise UsageError(f"{name}: no such checkpoint directory")
    path = models_dir(models) / name
    if not path.is_dir():
        raise UsageError(f"no model {name!r} in {path.parent}: give a checkpoint directory or a name there")
    return path


def cache_dir() -> Path:
    """Downloaded data (MNIST) lives here: FEWSTEP_CACHE, else ~/.cache/fewstep."""
    root = os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
