"""Reading a YAML file of settings, with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fewstep.errors import UsageError


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The file's top-level mapping ({} for an empty file); UsageError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: expected a mapping of keys to values")
    return loaded
