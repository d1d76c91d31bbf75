"""The models a server serves: every checkpoint directory under the models dir, and who falls back to whom.

A student that fails to load is still listed (with its error) so that its requests go to its teacher and
/readyz can say why the server is degraded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.errors import UsageError
from fewstep.models.checkpoint import Card, CheckpointError, read_card
from fewstep.models.pipeline import TRANSFORMER, TextToImage
from fewstep.paths import HOW

log = logging.getLogger("fewstep.server")


@dataclass
class ServedModel:
    name: str
    role: str  # teacher | student
    path: Path
    model: TextToImage | None = None
    card: Card | None = None
    teacher: str | None = None  # the teacher a student falls back to
    error: str | None = None  # why it cannot serve

    @property
    def ready(self) -> bool:
        return self.model is not None and self.error is None

    def supported_steps(self) -> list[int]:
        """A student's served step counts (Card.serves_steps: measured by `fewstep eval --write-card`, else those
        it was exported for); [] for a teacher, which serves any count its schedule allows."""
        return self.card.serves_steps() if self.card else []


@dataclass
class Registry:
    models: dict[str, ServedModel] = field(default_factory=dict)
    default: str | None = None

    @classmethod
    def scan(cls, directory: Path, device: torch.device, default: str | None = None, kernels: str = "auto") -> Registry:
        if not directory.is_dir():
            raise UsageError(f"no models directory at {directory}: {HOW}")
        reg = cls()
        # hidden directories are not models: a save in progress stages into .NAME.new (models/checkpoint.py)
        for sub in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (sub / "card.json").exists():
                continue
            try:
                card = read_card(sub)
            except CheckpointError as e:
                reg.models[sub.name] = ServedModel(sub.name, "student", sub, error=str(e))
                log.warning("cannot read %s: %s", sub, e)
                continue
            if card.role not in ("teacher", "student"):
                continue
            entry = ServedModel(card.name, card.role, sub, card=card)
            try:
                entry.model = TextToImage.load(sub, device, kernels)
            except CheckpointError as e:
                entry.error = str(e)
                log.warning("cannot load %s: %s", sub, e)
            reg.models[card.name] = entry
        if not reg.models:
            raise UsageError(f"no teacher or student checkpoint in {directory}")
        reg._link_teachers()  # if none of them loads, the server still starts and /readyz says why (503)
        reg.default = default or reg._pick_default()
        if reg.default not in reg.models:
            raise UsageError(f"--default-model {reg.default!r} is not among {sorted(reg.models)}")
        return reg

    @classmethod
    def of(cls, *entries: ServedModel, default: str | None = None) -> Registry:
        reg = cls({e.name: e for e in entries})
        reg._link_teachers()
        reg.default = default or reg._pick_default()
        return reg

    def teachers(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.role == "teacher" and m.ready]

    def _link_teachers(self) -> None:
        by_sha = {m.model.card.files[TRANSFORMER].sha256: m.name for m in self.teachers() if m.model.card}
        teachers = self.teachers()
        for m in self.models.values():
            if m.role != "student":
                continue
            ref = m.card.teacher if m.card else None
            if ref and ref.sha256 in by_sha:
                m.teacher = by_sha[ref.sha256]
            elif ref and ref.name in self.models and self.models[ref.name].role == "teacher":
                m.teacher = ref.name
            elif len(teachers) == 1:
                m.teacher = teachers[0].name

    def _pick_default(self) -> str:
        students = [m for m in self.models.values() if m.role == "student" and m.supported_steps()]
        if students:  # the student that needs the fewest steps; then the most recently trained
            return min(students, key=lambda m: (min(m.supported_steps()), m.name)).name
        teachers = self.teachers()
        return teachers[0].name if teachers else next(iter(self.models))

    def teacher_for(self, name: str) -> ServedModel | None:
        m = self.models[name]
        if m.role == "teacher":
            return m if m.ready else None
        t = self.models.get(m.teacher) if m.teacher else None
        return t if t is not None and t.ready else None
