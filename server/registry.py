"""The models a server serves: every checkpoint directory and diffusers pipeline folder (with a fewstep.json) under
the models dir, and who falls back to whom.

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
from fewstep.models.critic import CRITIC, load_critic
from fewstep.models.diffusers_model import INDEX, SPEC, DiffusersModel, PipelineSpec, SharedComponents, read_spec
from fewstep.models.pipeline import TRANSFORMER, TextToImage
from fewstep.models.sizes import Sizes
from fewstep.paths import HOW

log = logging.getLogger("fewstep.server")


@dataclass(frozen=True)
class LoadedGate:
    """A student's quality gate in memory: the critic and the card's per-step thresholds (training/gate.py)."""

    critic: torch.nn.Module
    thresholds: dict[str, float]

    def threshold(self, steps: int) -> float:
        """Images scoring under it are regenerated; a step count it was not calibrated for regenerates none."""
        return self.thresholds.get(str(steps), float("-inf"))


@dataclass
class ServedModel:
    """One served model: a fewstep checkpoint (``card``) or a diffusers pipeline folder (``spec``)."""

    name: str
    role: str  # teacher | student
    path: Path
    model: TextToImage | DiffusersModel | None = None
    card: Card | None = None
    spec: PipelineSpec | None = None
    teacher: str | None = None  # the teacher a student falls back to
    error: str | None = None  # why it cannot serve
    gate: LoadedGate | None = None  # its quality gate (card.gate), when the critic loaded
    gate_error: str | None = None  # why a gate its card names is not in use

    @property
    def ready(self) -> bool:
        return self.model is not None and self.error is None

    def supported_steps(self) -> list[int]:
        """A student's served step counts (Card.serves_steps: measured by `fewstep eval --write-card`, else those
        it was exported for; a pipeline's fewstep.json); [] for a teacher, which runs any count up to max_steps."""
        if self.role != "student":
            return []
        if self.spec is not None:
            return sorted(self.spec.supported_steps or [])
        return self.card.serves_steps() if self.card else []

    @property
    def default_steps(self) -> int:
        if self.spec is not None:
            return self.spec.default_steps
        return self.card.sampling.default_steps if self.card and self.card.sampling else 1

    @property
    def max_steps(self) -> int:
        if self.spec is not None:
            return self.spec.max_steps
        return self.card.sampling.max_steps if self.card and self.card.sampling else 0

    @property
    def default_guidance(self) -> float:
        if self.spec is not None:
            return self.spec.guidance
        return self.card.sampling.guidance if self.card and self.card.sampling else 1.0

    @property
    def guidance_input(self) -> bool:
        """Whether a request may set guidance: teachers, and students that take the scale as an input (a
        guidance embedding); a student with CFG distilled in would apply it twice (docs/api.md)."""
        if self.role == "teacher":
            return True
        if self.spec is not None:
            return self.spec.guidance_input
        return bool(self.card and self.card.model.get("transformer", {}).get("guidance_embed"))

    @property
    def fd(self) -> dict[int, float]:
        """Measured Fréchet distance per step count (fewstep eval), for choosing among students."""
        evaluation = self.card.evaluation if self.card else None
        return {r.steps: r.fd for r in evaluation.rows} if evaluation else {}

    @property
    def sizes(self) -> Sizes | None:
        if self.model is not None:
            return self.model.sizes
        if self.spec is not None:  # not loaded: the limits its fewstep.json declares (FLUX.1's multiple of 16)
            sp = self.spec
            return Sizes(sp.width, sp.height, sp.size_multiple or 16, sp.min_side, sp.max_side, sp.max_pixels)
        size = self.card.model.get("image_size", 32) if self.card else None
        return Sizes.fixed(size, size) if size else None


@dataclass
class Registry:
    models: dict[str, ServedModel] = field(default_factory=dict)
    default: str | None = None
    shared_bytes: int = 0  # memory not spent twice: components identical across pipelines, loaded once

    @classmethod
    def scan(cls, directory: Path, device: torch.device, default: str | None = None, kernels: str = "auto") -> Registry:
        """Every fewstep checkpoint (card.json) and diffusers pipeline folder with a fewstep.json under
        ``directory``. One that cannot be loaded is listed with its error (the server is degraded, not down)."""
        if not directory.is_dir():
            raise UsageError(f"no models directory at {directory}: {HOW}")
        reg = cls()
        shared = SharedComponents()
        # hidden directories are not models: a save in progress stages into .NAME.new (models/checkpoint.py)
        for sub in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (sub / "card.json").exists():
                entry = _load_checkpoint(sub, device, kernels)
            elif (sub / INDEX).exists():
                entry = _load_pipeline(sub, device, kernels, shared)
            else:
                continue
            if entry is not None:
                reg.models[entry.name] = entry
        if not reg.models:
            raise UsageError(f"no teacher or student checkpoint in {directory}")
        reg.shared_bytes = shared.bytes_saved
        if shared.bytes_saved:
            log.info("components shared between pipelines: %.1f MB loaded once", shared.bytes_saved / 2**20)
        reg._link_teachers()  # if none of them loads, the server still starts and /readyz says why (503)
        reg._load_gates(directory, device)
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

    def _load_gates(self, directory: Path, device: torch.device) -> None:
        """Each student whose card names a gate gets its critic (a ``role: gate`` checkpoint beside it, with the
        weights the card names). One that cannot be used is logged and listed in /v1/models; the student serves
        without it."""
        for m in self.models.values():
            ref = m.card.gate if m.card is not None else None
            if ref is None or m.model is None:
                continue
            try:
                critic, card = load_critic(directory / ref.name)
                if card.files[CRITIC].sha256 != ref.sha256:
                    raise CheckpointError(f"{ref.name}: not the weights {m.name}'s card was calibrated with")
                m.gate = LoadedGate(critic.to(device), dict(ref.thresholds))
            except CheckpointError as e:
                m.gate_error = str(e)
                log.warning("the quality gate of %s is not in use: %s", m.name, e)

    def teachers(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.role == "teacher" and m.ready]

    def _link_teachers(self) -> None:
        by_sha = {m.card.files[TRANSFORMER].sha256: m.name for m in self.teachers() if m.card}
        teachers = [t for t in self.teachers() if t.card]  # a checkpoint's lone teacher, never a pipeline
        for m in self.models.values():
            if m.role != "student":
                continue
            if m.spec is not None:  # a pipeline names its teacher; no guessing among other families' teachers
                named = self.models.get(m.spec.teacher or "")
                m.teacher = named.name if named is not None and named.role == "teacher" else None
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


def _load_checkpoint(sub: Path, device: torch.device, kernels: str) -> ServedModel | None:
    try:
        card = read_card(sub)
    except CheckpointError as e:
        log.warning("cannot read %s: %s", sub, e)
        return ServedModel(sub.name, "student", sub, error=str(e))
    if card.role not in ("teacher", "student"):
        return None
    entry = ServedModel(card.name, card.role, sub, card=card)
    try:
        entry.model = TextToImage.load(sub, device, kernels)
    except CheckpointError as e:
        entry.error = str(e)
        log.warning("cannot load %s: %s", sub, e)
    return entry


def _load_pipeline(sub: Path, device: torch.device, kernels: str, shared: SharedComponents) -> ServedModel | None:
    if not (sub / SPEC).exists():
        log.warning("%s: a diffusers pipeline without a %s is not served (docs/checkpoints.md)", sub, SPEC)
        return None
    try:
        spec = read_spec(sub)
    except UsageError as e:
        log.warning("cannot read %s: %s", sub, e)
        return ServedModel(sub.name, "student", sub, error=str(e))
    entry = ServedModel(spec.name, spec.role, sub, spec=spec)
    try:
        entry.model = DiffusersModel.load(sub, device, kernels, shared, spec)
    except Exception as e:  # a broken folder fails in many libraries' ways: the server serves the rest
        entry.error = f"cannot load {sub.name}: {type(e).__name__}: {str(e)[:300]}"
        log.warning("%s", entry.error)
    return entry
