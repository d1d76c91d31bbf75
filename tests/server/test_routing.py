"""route() and readiness() are pure functions over a snapshot: a table per fallback reason and health state."""

import pytest

from fewstep.server.routing import Decision, ModelView, RouteError, Snapshot, readiness, route

T = ModelView("teacher", "teacher", default_steps=40, max_steps=100)
FAST = ModelView("fast", "student", serves=(1, 2, 4), teacher="teacher", fd={1: 300.0, 2: 310.0, 4: 320.0})
ONE = ModelView("one", "student", serves=(1,), teacher="teacher", fd={1: 220.0})


def snap(*views: ModelView, default: str = "one") -> Snapshot:
    return Snapshot({v.name: v for v in views}, default, max_request_steps=100)


def broken(view: ModelView, **change) -> ModelView:
    from dataclasses import replace

    return replace(view, **change)


HEALTHY = snap(T, FAST, ONE)
UNLOADED_ONE = snap(T, FAST, broken(ONE, loaded=False, error="warm-up failed: non-finite output"))
OPEN_ONE = snap(T, FAST, broken(ONE, circuit_open=True))
ALL_STUDENTS_DOWN = snap(T, broken(FAST, loaded=False), broken(ONE, circuit_open=True))


@pytest.mark.parametrize(
    ("snapshot", "model", "steps", "teacher", "expect"),
    [
        # the asked-for student serves
        (HEALTHY, None, None, False, Decision("one", 1)),
        (HEALTHY, "fast", 4, False, Decision("fast", 4)),
        (HEALTHY, "teacher", None, False, Decision("teacher", 40)),
        (HEALTHY, "teacher", 7, False, Decision("teacher", 7)),
        # unnamed: the best healthy student that serves the count (lowest measured FD), before any teacher
        (HEALTHY, None, 2, False, Decision("fast", 2)),
        (HEALTHY, None, 1, False, Decision("one", 1)),
        # every fallback reason
        (HEALTHY, None, 1, True, Decision("teacher", 40, "teacher_requested")),
        (HEALTHY, "fast", 3, False, Decision("teacher", 40, "steps_unsupported")),
        (HEALTHY, "fast", 8, False, Decision("teacher", 8, "steps_unsupported")),
        (UNLOADED_ONE, "one", 1, False, Decision("teacher", 40, "student_unavailable")),
        (OPEN_ONE, "one", 1, False, Decision("teacher", 40, "circuit_open")),
        # health decides traffic: an unhealthy default no longer claims its counts for unnamed requests
        (UNLOADED_ONE, None, 1, False, Decision("fast", 1)),
        (UNLOADED_ONE, None, None, False, Decision("fast", 1)),
        (OPEN_ONE, None, 1, False, Decision("fast", 1)),
        (ALL_STUDENTS_DOWN, None, 1, False, Decision("teacher", 40, "circuit_open")),
        (HEALTHY, None, 3, False, Decision("teacher", 3, "steps_unsupported")),  # beyond "one"'s 1: honoured
    ],
)
def test_route(snapshot, model, steps, teacher, expect):
    assert route(snapshot, model, steps, teacher) == expect


@pytest.mark.parametrize(
    ("snapshot", "model", "steps", "status", "code"),
    [
        (HEALTHY, "nobody", None, 404, "model_not_found"),
        (HEALTHY, "x" * 5000, None, 404, "model_not_found"),
        (HEALTHY, None, 101, 400, "invalid_value"),
        (snap(broken(T, loaded=False, error="gone"), FAST, ONE), "teacher", None, 503, "model_unavailable"),
        (snap(broken(T, loaded=False), broken(ONE, loaded=False)), "one", 1, 503, "model_unavailable"),
        (snap(ModelView("orphan", "student", serves=(1,)), default="orphan"), "orphan", 2, 400, "invalid_value"),
    ],
)
def test_route_errors(snapshot, model, steps, status, code):
    with pytest.raises(RouteError) as e:
        route(snapshot, model, steps)
    assert (e.value.status, e.value.code) == (status, code)
    assert len(str(e.value)) < 200  # a long model name is quoted short, not echoed


@pytest.mark.parametrize(
    ("snapshot", "warm", "draining", "alive", "state"),
    [
        (HEALTHY, True, False, True, "ready"),
        (HEALTHY, False, False, True, "unavailable"),
        (HEALTHY, True, True, True, "unavailable"),
        (HEALTHY, True, False, False, "unavailable"),
        (UNLOADED_ONE, True, False, True, "degraded"),
        (OPEN_ONE, True, False, True, "degraded"),
        (
            snap(broken(T, loaded=False), broken(ONE, loaded=False), broken(FAST, loaded=False)),
            True,
            False,
            True,
            "unavailable",
        ),
    ],
)
def test_readiness(snapshot, warm, draining, alive, state):
    got, causes = readiness(snapshot, warm, draining, alive)
    assert got == state
    assert (state == "ready") == (not causes)


def test_a_count_beyond_the_teacher_is_a_400_not_a_model_error():
    short = snap(broken(T, max_steps=50), FAST, ONE)
    with pytest.raises(RouteError) as e:
        route(short, "teacher", 60)
    assert (e.value.status, e.value.param) == (400, "steps")
    with pytest.raises(RouteError):
        route(short, "fast", 60)  # the fallback would hand the teacher 60 steps


DISTILLED = ModelView("distilled", "student", serves=(1, 2), teacher="teacher", guidance_input=False,
                      default_guidance=1.0)  # fmt: skip
EMBEDDED = ModelView("embedded", "student", serves=(1,), teacher="teacher", guidance_input=True, default_guidance=3.0)
GUIDED = snap(T, DISTILLED, EMBEDDED, default="distilled")


@pytest.mark.parametrize(
    ("model", "steps", "teacher", "guidance", "expect"),
    [
        (None, 1, False, None, Decision("distilled", 1)),  # no guidance asked: the student's own
        (None, 1, False, 1.0, Decision("distilled", 1)),  # the scale it was distilled at: nothing applied twice
        ("embedded", 1, False, 5.0, Decision("embedded", 1)),  # an input: any scale
        (None, 1, True, 5.0, Decision("teacher", 40, "teacher_requested")),  # the teacher takes any scale
        (None, 8, False, 5.0, Decision("teacher", 8, "steps_unsupported")),  # falls back: the teacher runs it
    ],
)
def test_guidance_goes_where_it_is_applied_once(model, steps, teacher, guidance, expect):
    assert route(GUIDED, model, steps, teacher, guidance) == expect


def test_guidance_for_a_student_with_cfg_distilled_in_is_a_400_naming_the_field():
    with pytest.raises(RouteError) as info:
        route(GUIDED, None, 2, False, 3.0)
    assert (info.value.status, info.value.param) == (400, "guidance")
    assert "distilled in" in str(info.value) and "twice" in str(info.value)
