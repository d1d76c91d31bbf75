"""The checkpoint format: a directory of safetensors weights plus a JSON card validated with pydantic.

    my-model/
      card.json                 name, role, architecture, sampling, files (sha256, bytes), provenance, metrics
      transformer.safetensors   text_encoder.safetensors   autoencoder.safetensors   tokenizer.json

Loading verifies the card, each file's size and sha256, and every tensor's shape, and reports the first
problem as one CheckpointError naming the file, never as a stack trace from inside torch.
Saving never overwrites an existing checkpoint unless asked, and writes through a temporary directory, so
a crash leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fewstep import __version__

CARD = "card.json"
FORMAT_VERSION = 1
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TeacherRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the teacher's transformer.safetensors


class Sampling(BaseModel):
    """How to sample the model. A student supports exactly the step counts listed in ``timesteps``."""

    model_config = ConfigDict(extra="forbid")
    default_steps: int = Field(ge=1)
    # euler: integrate the flow ODE.  x0: predict the clean sample, re-noise to the next time
    # (multistep consistency sampling; DMD2's backward simulation).
    sampler: Literal["euler", "x0"] = "euler"
    any_steps: bool = False  # a teacher: every count up to max_steps works with its schedule
    schedule: Literal["uniform", "shifted"] = "uniform"
    shift: float = Field(default=1.0, gt=0)
    timesteps: dict[str, list[float]]  # "steps" -> grid from 1 (noise) down to 0, steps + 1 entries
    guidance: float = Field(default=1.0, ge=0)  # default CFG scale; 1 = no guidance
    max_steps: int = Field(default=1000, ge=1)
    # consistency parameterisation (role student, parameterization "consistency"): c_skip / c_out constants
    sigma_data: float = Field(default=0.5, gt=0)
    boundary_scale: float = Field(default=1000.0, gt=0)

    def supported_steps(self) -> list[int]:
        return sorted(int(k) for k in self.timesteps)


class Card(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1)
    role: Literal["teacher", "student", "autoencoder", "classifier"]
    model: dict[str, Any]  # the architecture config (models/config.py), validated by the loader of the role
    parameterization: Literal["velocity", "consistency"] = "velocity"
    sampling: Sampling | None = None
    files: dict[str, FileEntry]
    training: dict[str, Any] = Field(default_factory=dict)  # method, hyperparameters, duration_s, ...
    teacher: TeacherRef | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    fewstep_version: str = __version__
    created: str = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_card(directory: str | Path) -> Card:
    directory = Path(directory)
    path = directory / CARD
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (every checkpoint directory has a card.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        card = Card.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "card"
        raise CheckpointError(f"{path}: {where}: {first['msg']}") from None
    if card.format_version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {card.format_version} is not supported ({FORMAT_VERSION})")
    return card


def verify_file(directory: Path, card: Card, name: str) -> Path:
    path = directory / name
    entry = card.files.get(name)
    if entry is None:
        raise CheckpointError(f"{directory / CARD}: files does not list {name}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    size = path.stat().st_size
    if size != entry.bytes:
        raise CheckpointError(f"{path}: {size} bytes, the card says {entry.bytes} (truncated or replaced?)")
    if sha256_file(path) != entry.sha256:
        raise CheckpointError(f"{path}: sha256 does not match the card (corrupted or replaced)")
    return path


def load_weights(directory: str | Path, card: Card, name: str, module: torch.nn.Module) -> None:
    """Verify ``name`` against the card and load it into ``module`` strictly, checking every shape."""
    directory = Path(directory)
    path = verify_file(directory, card, name)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the architecture in card.json "
            f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''})"
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, the architecture needs {tuple(expected[key].shape)}"
            )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(param.dtype))


def state_to_save(module: torch.nn.Module, dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors in ``dtype``; contiguous, detached copies (safetensors refuses shared storage)."""
    target = DTYPES[dtype]
    return {
        k: (v.detach().to(target) if v.is_floating_point() else v.detach()).contiguous().cpu().clone()
        for k, v in module.state_dict().items()
    }


def save_checkpoint(
    directory: str | Path,
    card: dict[str, Any],
    weights: dict[str, torch.nn.Module],
    texts: dict[str, str] | None = None,
    dtype: str = "float16",
    overwrite: bool = False,
) -> Card:
    """Write ``weights`` (file name -> module) and ``texts`` (file name -> contents) plus the card.

    ``card`` holds every Card field except ``files``, which is computed here.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise CheckpointError(f"{directory}: already exists and is not empty (pass overwrite to replace it)")
    if dtype not in DTYPES:
        raise CheckpointError(f"export dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        files: dict[str, FileEntry] = {}
        for name, module in weights.items():
            save_file(state_to_save(module, dtype), str(tmp / name))
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
        for path in sorted(tmp.iterdir()):
            path.chmod(0o644)  # mkdtemp and safetensors create owner-only files; a checkpoint is for sharing
            files[path.name] = FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
        validated = Card.model_validate({**card, "files": files})
        (tmp / CARD).write_text(validated.model_dump_json(indent=2) + "\n")
        (tmp / CARD).chmod(0o644)
        tmp.chmod(0o755)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return validated
