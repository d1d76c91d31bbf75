"""Where fewstep finds its shipped models and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def zoo_dir() -> Path:
    """The shipped checkpoints: ``zoo/`` of the repo, or FEWSTEP_ZOO when the package is installed elsewhere."""
    return Path(os.environ.get("FEWSTEP_ZOO", REPO_ROOT / "zoo"))


def cache_dir() -> Path:
    """Downloaded data (MNIST) lives here: FEWSTEP_CACHE, else ~/.cache/fewstep."""
    root = os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
