"""The checkpoint format: a directory of safetensors weights plus a JSON card validated with pydantic.

    my-model/
      card.json                 name, role, architecture, sampling, files (sha256, bytes), provenance, metrics
      transformer.safetensors   text_encoder.safetensors   autoencoder.safetensors   tokenizer.json

Loading verifies the card, each file's size and sha256, and every tensor's shape, and reports the first
problem as one CheckpointError naming the file, never as a stack trace from inside torch.

Saving never overwrites an existing checkpoint unless asked, and is crash-safe: a crash (or an exception) at
any point of a save leaves the old checkpoint or the new one whole, never a mix and never neither, and the
next read_card or save_checkpoint puts it back in place. A save of ``my-model`` goes in three steps:

1. stage: write every file into the sibling ``.my-model.new`` (a stale one is removed first), fsync each,
   and write card.json last and atomically (``card.json.part``, fsync, ``os.replace``). A staging
   directory holding a card.json is therefore complete.
2. commit: rename ``my-model`` to ``.my-model.old`` (if there is one), then ``.my-model.new`` to ``my-model``.
3. clean up: remove ``.my-model.old``.

``recover`` repairs what a crash leaves behind with one rule: if ``my-model`` is missing, move the complete
``.my-model.new`` into its place, or else ``.my-model.old``; then delete whatever ``.new`` and ``.old`` are
left. So a save whose old checkpoint was already moved aside (or, for a first save, whose card.json was
written) is finished; one interrupted earlier is dropped and the old checkpoint stays.
When nothing needs recovering, recovery writes nothing (a read-only models directory is fine).
Saves hold an advisory lock (flock) on the parent directory, and recovery takes it before touching anything,
so a reader never mistakes a save in progress for a crash's leftovers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fewstep import __version__

try:
    import fcntl
except ImportError:  # Windows: no flock; saving and reading one checkpoint at a time is then up to the caller
    fcntl = None  # type: ignore[assignment]

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


class Compression(BaseModel):
    """Lineage of a compressed model (``fewstep compress``): which of its source's blocks it kept, why, and how
    it was trained back."""

    model_config = ConfigDict(extra="forbid")
    source: TeacherRef  # the full model the blocks came from
    criterion: str  # io_mse | output_loss | bi | keep (an explicit list)
    kept: list[str]  # the source's block names, in order: double.0, ..., single.0, ...
    removed: list[str]
    weights: dict[str, float]  # task, output_kd, feature_kd
    feature_norm: Literal["plain", "per_block"]


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


class EvalRow(BaseModel):
    """One measured row of the colored-digits benchmark (``fewstep eval``)."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(ge=1)
    digit_accuracy: float = Field(ge=0, le=1)
    fg_accuracy: float = Field(ge=0, le=1)
    bg_accuracy: float = Field(ge=0, le=1)
    fd: float = Field(ge=0)  # Fréchet distance in the judge's feature space
    ms_per_image: float = Field(ge=0)


class GuidanceRow(BaseModel):
    """One guidance scale of a sweep (``fewstep eval --guidance 1.5,2,3``), at the first evaluated step count."""

    model_config = ConfigDict(extra="forbid")
    guidance: float = Field(ge=0)
    steps: int = Field(ge=1)
    digit_accuracy: float = Field(ge=0, le=1)
    fg_accuracy: float = Field(ge=0, le=1)
    bg_accuracy: float = Field(ge=0, le=1)
    fd: float = Field(ge=0)


class Evaluation(BaseModel):
    """What ``fewstep eval --write-card`` measured; routing reads it (never hand-written)."""

    model_config = ConfigDict(extra="forbid")
    benchmark: str = "colored-digits"
    n: int = Field(ge=2)
    guidance: float
    real_floor_fd: float  # the real-vs-real Fréchet distance at the same n: FD moves with n
    judge: TeacherRef  # the classifier: name and sha256 of its weights
    data: str
    device: str
    rows: list[EvalRow] = Field(min_length=1)
    # a student serves the step counts whose digit and color accuracies all reach min_accuracy; None: a teacher
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    serves_steps: list[int] | None = None
    # a guidance sweep: every scale measured, and the accuracy the chosen one (sampling.guidance) had to reach
    guidance_sweep: list[GuidanceRow] | None = None
    guidance_min_accuracy: float | None = Field(default=None, ge=0, le=1)
    command: str
    created: str = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


class Gate(BaseModel):
    """A student's quality gate: the critic checkpoint (by name in the models directory, and its weights' sha256)
    and, per step count, the score under which an image is regenerated by the teacher (``fewstep
    calibrate-gate``: the share ``rate`` of calibration images falls under it)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rate: float = Field(ge=0, le=1)
    thresholds: dict[str, float]  # "steps" -> score
    n: int = Field(ge=1)  # calibration images per step count
    measured: dict[str, dict[str, float]] = Field(default_factory=dict)  # "steps" -> sent, wrong_caught, ...
    command: str
    created: str = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


class Card(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1)
    # "transformer": an MMDiT alone (a Flux transformer converted from diffusers: models/convert.py)
    # "gate": a critic that scores a student's images (training/gate.py), not served itself
    role: Literal["teacher", "student", "autoencoder", "classifier", "transformer", "gate"]
    model: dict[str, Any]  # the architecture config (models/config.py), validated by the loader of the role
    # consistency-lcm / consistency: f = c_skip·x + c_out·(x − t·v), c_out -> 1 or -> σd (models/flow.py)
    parameterization: Literal["velocity", "consistency-lcm", "consistency"] = "velocity"
    sampling: Sampling | None = None
    files: dict[str, FileEntry]
    training: dict[str, Any] = Field(default_factory=dict)  # method, hyperparameters, duration_s, ...
    teacher: TeacherRef | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)  # training-time measurements (autoencoder, judge)
    evaluation: Evaluation | None = None  # the benchmark, written by `fewstep eval --write-card`
    compression: Compression | None = None  # a model made by removing blocks from another (fewstep compress)
    gate: Gate | None = None  # a student's quality gate (fewstep calibrate-gate)
    fewstep_version: str = __version__
    created: str = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def serves_steps(self) -> list[int]:
        """The step counts a student serves: measured and passed (``evaluation``), else those it was exported
        for. A teacher serves any count its sampling allows (an empty list here)."""
        if self.role != "student" or self.sampling is None:
            return []
        if self.evaluation is not None and self.evaluation.serves_steps is not None:
            return sorted(self.evaluation.serves_steps)
        return self.sampling.supported_steps()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_card(directory: str | Path) -> Card:
    """The validated card, after recovering from what an interrupted save left (see the module docstring)."""
    directory = Path(directory)
    recover(directory)
    return _read_card(directory)


def _read_card(directory: Path) -> Card:
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


def load_module(directory: str | Path, role: str, build, name: str) -> tuple[torch.nn.Module, Card]:
    """A single-network checkpoint of ``role``: ``build(**card.model)`` with the weights of file ``name``, in eval
    mode and frozen, and its card (the judge, a quality-gate critic)."""
    card = read_card(directory)
    where = Path(directory) / CARD
    if card.role != role:
        raise CheckpointError(f"{where}: role is {card.role!r}, expected {role!r}")
    try:
        module = build(**card.model)
    except TypeError as e:
        raise CheckpointError(f"{where}: model: {e}") from None
    load_weights(directory, card, name, module)
    return module.eval().requires_grad_(False), card


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


def _siblings(directory: Path) -> tuple[Path, Path]:
    """The staging directory and the set-aside old checkpoint of ``directory``."""
    return directory.parent / f".{directory.name}.new", directory.parent / f".{directory.name}.old"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in ``path`` durable; best effort (not every OS can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def _lock(parent: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on ``parent`` (the directory holding checkpoints); yield whether it is held.

    Only ``blocking=False`` can yield False (someone else holds it). Where flock is unavailable (no fcntl,
    a filesystem without it) this yields True and locks nothing.
    """
    fd = None
    held = True
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(parent, os.O_RDONLY)
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = False
        except OSError:
            pass  # no flock on this filesystem: go on unlocked
    try:
        yield held
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def recover(directory: str | Path) -> None:
    """Repair what an interrupted save of ``directory`` left behind (the rule is in the module docstring).

    Writes nothing when there is nothing to repair. While another process is saving beside ``directory``
    leftovers are left alone unless ``directory`` is missing, in which case this waits for that save.
    Raises CheckpointError when ``directory`` is missing and cannot be restored from what the save left.
    """
    directory = Path(directory)
    new, old = _siblings(directory)
    if not (os.path.lexists(new) or os.path.lexists(old)):
        return
    with _lock(directory.parent, blocking=False) as held:
        if held:
            _recover(directory)
            return
    if not os.path.lexists(directory):
        with _lock(directory.parent):
            _recover(directory)


def _recover(directory: Path) -> None:
    """``recover`` with the lock held."""
    new, old = _siblings(directory)
    if not os.path.lexists(directory):
        source = new if (new / CARD).is_file() else old if os.path.lexists(old) else None
        if source is not None:
            try:
                os.rename(source, directory)
            except OSError as e:
                raise CheckpointError(
                    f"{directory}: missing; an interrupted save left {source.name} beside it, "
                    f"which cannot be moved into place ({e.strerror or e})"
                ) from None
            _fsync_dir(directory.parent)
    for leftover in (new, old):
        if os.path.lexists(leftover):
            with contextlib.suppress(OSError):  # best effort: the checkpoint in place is whole either way
                _remove(leftover)


def _refuse_to_overwrite(directory: Path, overwrite: bool) -> None:
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise CheckpointError(f"{directory}: already exists and is not empty (pass overwrite to replace it)")


def save_checkpoint(
    directory: str | Path,
    card: dict[str, Any],
    weights: dict[str, torch.nn.Module],
    texts: dict[str, str] | None = None,
    dtype: str = "float16",
    overwrite: bool = False,
) -> Card:
    """Write ``weights`` (file name -> module) and ``texts`` (file name -> contents) plus the card.

    ``card`` holds every Card field except ``files``, which is computed here. Crash-safe: see the module
    docstring.
    """
    directory = Path(directory)
    texts = texts or {}
    recover(directory)
    _refuse_to_overwrite(directory, overwrite)
    if dtype not in DTYPES:
        raise CheckpointError(f"export dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    Card.model_validate({**card, "files": {}})  # a bad card fails here, before anything is written
    directory.parent.mkdir(parents=True, exist_ok=True)
    new, old = _siblings(directory)
    with _lock(directory.parent):
        _recover(directory)
        _refuse_to_overwrite(directory, overwrite)  # again: another process may have saved meanwhile
        if os.path.lexists(new):
            _remove(new)  # a stale staging directory recovery could not remove
        # 1. stage
        new.mkdir()
        new.chmod(0o755)
        for name, module in weights.items():
            save_file(state_to_save(module, dtype), str(new / name))
            _fsync_file(new / name)
        for name, text in texts.items():
            _write_text(new / name, text)
        files: dict[str, FileEntry] = {}
        for name in sorted({*weights, *texts}):
            path = new / name
            path.chmod(0o644)  # safetensors may create owner-only files; a checkpoint is for sharing
            files[name] = FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
        validated = Card.model_validate({**card, "files": files})
        part = new / f"{CARD}.part"
        _write_text(part, validated.model_dump_json(indent=2) + "\n")
        part.chmod(0o644)
        os.replace(part, new / CARD)  # from here the staging directory is complete
        _fsync_dir(new)
        # 2. commit
        if os.path.lexists(directory):
            os.rename(directory, old)  # the commit point: from here recovery finishes this save
        os.rename(new, directory)
        _fsync_dir(directory.parent)
        # 3. clean up
        with contextlib.suppress(OSError):  # the save is done; recovery removes what is left
            _remove(old)
    return validated


def update_card(directory: str | Path, **changes: Any) -> Card:
    """Rewrite only the card of a checkpoint (``fewstep eval --write-card``): the weights stay as they are, their
    sizes and hashes are checked first, and the new card replaces the old in one atomic rename."""
    directory = Path(directory)
    recover(directory)  # may wait for the lock itself: before taking it
    with _lock(directory.parent):  # no save may commit between reading the card and writing it back
        card = _read_card(directory)
        for name in card.files:
            verify_file(directory, card, name)
        updated = Card.model_validate({**card.model_dump(), **changes})
        part = directory / f"{CARD}.part"
        _write_text(part, updated.model_dump_json(indent=2) + "\n")
        part.chmod(0o644)
        os.replace(part, directory / CARD)
        _fsync_dir(directory)
    return updated
