"""Reading a YAML file of settings, with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The file's top-level mapping ({} for an empty file); ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values")
    return loaded
