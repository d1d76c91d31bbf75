"""Who serves a request, and whether the server is ready: pure functions over a snapshot of the models' health.

The engine takes a ``Snapshot`` of the registry and the circuit breakers at the moment a request arrives, so
routing is a function of plain data, tested by tables (tests/server/test_routing.py), and a student's health
decides its traffic: a student that failed to load, failed its warm-up, or whose circuit is open no longer
claims its step counts; its requests go to a healthy student that serves them (when none was named) or to its
teacher, with the reason in the response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fewstep.server.errors import quote

# why a request did not go to the student that would have served it (the `fallback_reason` field, and a label)
FALLBACK_REASONS = ("teacher_requested", "student_unavailable", "steps_unsupported", "circuit_open", "student_error",
                    "quality_gate")  # fmt: skip


@dataclass(frozen=True)
class ModelView:
    """What routing needs to know of one served model."""

    name: str
    role: str  # "teacher" | "student"
    default_steps: int = 1
    serves: tuple[int, ...] = ()  # a student's served step counts (its card's measured ones)
    max_steps: int = 0  # a teacher runs 1..max_steps
    loaded: bool = True  # False: failed to load or failed warm-up (``error`` says why)
    circuit_open: bool = False
    teacher: str | None = None  # the teacher a student falls back to
    fd: dict[int, float] = field(default_factory=dict)  # measured Fréchet distance per step count
    error: str | None = None
    # a student whose CFG was distilled in samples at default_guidance and takes no guidance input: another
    # scale would apply guidance twice. Teachers and guidance-embedded students take one.
    guidance_input: bool = True
    default_guidance: float = 1.0

    @property
    def healthy(self) -> bool:
        return self.loaded and not self.circuit_open

    def can_serve(self, steps: int) -> bool:
        return steps in self.serves if self.role == "student" else 1 <= steps <= self.max_steps


@dataclass(frozen=True)
class Snapshot:
    models: dict[str, ModelView]
    default: str
    max_request_steps: int  # the server's max_teacher_steps


@dataclass(frozen=True)
class Decision:
    model: str  # who runs it
    steps: int
    reason: str | None = None  # a fallback reason, or None when the asked-for model serves


class RouteError(Exception):
    """A request no model can take: ``status`` 400/404 for the request's fault, 503 when nothing can serve."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def best_student(snap: Snapshot, steps: int) -> ModelView | None:
    """Among healthy students that serve ``steps``, the one with the lowest measured FD there (then by name)."""
    fit = [m for m in snap.models.values() if m.role == "student" and m.healthy and m.can_serve(steps)]
    return min(fit, key=lambda m: (m.fd.get(steps, float("inf")), m.name)) if fit else None


def route(
    snap: Snapshot, model: str | None, steps: int | None, want_teacher: bool = False, guidance: float | None = None
) -> Decision:
    """-> who serves, at how many steps, and why not the student (``FALLBACK_REASONS``)."""
    decision = _route(snap, model, steps, want_teacher)
    serving = snap.models[decision.model]
    if guidance is not None and not serving.guidance_input and guidance != serving.default_guidance:
        raise RouteError(
            400,
            f"{serving.name} has guidance {serving.default_guidance:g} distilled in and takes no guidance input "
            "(another scale would apply guidance twice): leave guidance out, or ask for the teacher",
            "invalid_value",
            "guidance",
        )
    return decision


def _route(snap: Snapshot, model: str | None, steps: int | None, want_teacher: bool) -> Decision:
    name = model or snap.default
    entry = snap.models.get(name)
    if entry is None:
        raise RouteError(
            404, f"model {quote(name)} does not exist; GET /v1/models lists the models", "model_not_found", "model"
        )
    if steps is not None and steps > snap.max_request_steps:
        raise RouteError(400, f"steps must be at most {snap.max_request_steps}", "invalid_value", "steps")
    if model is None and entry.role == "student" and not want_teacher:
        wanted = entry.default_steps if steps is None else steps
        if not (entry.healthy and entry.can_serve(wanted)):
            # no model named: a healthy student serving this count beats falling back to the teacher
            entry = best_student(snap, wanted) or entry
    if entry.role == "teacher":
        if not entry.loaded:
            raise RouteError(503, f"{entry.name} is not available: {entry.error}", "model_unavailable")
        _check_teacher_steps(entry, steps)
        return Decision(entry.name, steps or entry.default_steps)
    if want_teacher:
        reason = "teacher_requested"
    elif not entry.loaded:
        reason = "student_unavailable"
    elif steps is not None and not entry.can_serve(steps):
        reason = "steps_unsupported"
    elif entry.circuit_open:
        reason = "circuit_open"
    else:
        return Decision(entry.name, steps or entry.default_steps)
    teacher = snap.models.get(entry.teacher) if entry.teacher else None
    if teacher is None or not teacher.loaded:
        if reason == "steps_unsupported":
            raise RouteError(
                400,
                f"{entry.name} serves steps {list(entry.serves)} and has no teacher to serve {steps}",
                "invalid_value",
                "steps",
            )
        raise RouteError(
            503, f"{entry.name} cannot serve ({reason}) and its teacher is not available", "model_unavailable"
        )
    # a count the teacher can run beyond the student's is honoured; otherwise (a student's 1-4) its default
    t_steps = steps if steps is not None and steps > max(entry.serves or (0,)) else None
    _check_teacher_steps(teacher, t_steps)
    return Decision(teacher.name, t_steps or teacher.default_steps, reason)


def _check_teacher_steps(teacher: ModelView, steps: int | None) -> None:
    if steps is not None and not teacher.can_serve(steps):
        raise RouteError(
            400, f"{teacher.name} runs 1 to {teacher.max_steps} steps, not {steps}", "invalid_value", "steps"
        )


def readiness(snap: Snapshot, warmed_up: bool, draining: bool, batcher_alive: bool = True) -> tuple[str, list[str]]:
    """("ready" | "degraded" | "unavailable", causes): unavailable answers /readyz with 503."""
    if draining:
        return "unavailable", ["draining: shutting down"]
    if not warmed_up:
        return "unavailable", ["warming up"]
    if not batcher_alive:
        return "unavailable", ["the batcher stopped; it is being restarted"]
    causes = []
    for m in snap.models.values():
        if not m.loaded:
            causes.append(f"{m.name}: {m.error}")
        elif m.circuit_open:
            causes.append(f"{m.name}: circuit open after repeated failures")
    if not any(m.loaded for m in snap.models.values()):
        return "unavailable", causes or ["no model loaded"]
    return ("degraded" if causes else "ready"), causes
