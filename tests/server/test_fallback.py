"""Teacher fallback: every path, the circuit breaker, and how it shows in responses and metrics."""

import asyncio
import json
import shutil

import pytest

from tests.serving import make_settings, serve_app

pytestmark = pytest.mark.anyio


async def _gen(c, **kw):
    r = await c.post("/v1/generate", json={"prompt": "a red 7 on black", "seed": 1, **kw})
    assert r.status_code == 200, r.text
    return r.json()


async def test_more_steps_than_the_student_supports_go_to_the_teacher(api):
    body = await _gen(api, steps=12)
    assert (body["served_by"], body["steps"], body["fallback_reason"]) == ("tiny-teacher", 12, "steps_unsupported")
    body = await _gen(api, steps=3)  # a count the student lacks but within its range: the teacher's default
    assert (body["served_by"], body["steps"], body["fallback_reason"]) == ("tiny-teacher", 4, "steps_unsupported")
    body = await _gen(api, quality="teacher")
    assert (body["served_by"], body["fallback_reason"]) == ("tiny-teacher", "teacher_requested")
    body = await _gen(api, model="tiny-teacher", steps=6)
    assert (body["served_by"], body["steps"], body["fallback_reason"]) == ("tiny-teacher", 6, None)


async def test_a_student_that_failed_to_load_is_served_by_its_teacher(api):
    body = await _gen(api, model="tiny-broken", steps=1)
    assert (body["served_by"], body["fallback_reason"]) == ("tiny-teacher", "student_unavailable")
    assert len(body["images"]) == 1


async def test_a_student_that_returns_nan_is_regenerated_by_the_teacher(models_dir):
    settings = make_settings(models_dir, breaker_threshold=2, breaker_cooldown_s=1.0, warmup=False)
    async with serve_app(settings) as c:
        first = await _gen(c, model="tiny-nan", steps=1)
        assert (first["served_by"], first["fallback_reason"]) == ("tiny-teacher", "student_error")
        second = await _gen(c, model="tiny-nan", steps=1)
        assert second["fallback_reason"] == "student_error"
        # two consecutive failures open the circuit: the student is not even tried
        third = await _gen(c, model="tiny-nan", steps=1)
        assert third["fallback_reason"] == "circuit_open"
        assert "circuit open" in (await c.get("/readyz")).text
        await asyncio.sleep(1.1)  # after the cool-down one trial batch goes to the student again
        fourth = await _gen(c, model="tiny-nan", steps=1)
        assert fourth["fallback_reason"] == "student_error"
        metrics = (await c.get("/metrics")).text
    assert 'fewstep_fallbacks_total{reason="student_error"} 3.0' in metrics
    assert 'fewstep_fallbacks_total{reason="circuit_open"} 1.0' in metrics


async def test_a_student_that_raises_is_regenerated_by_the_teacher(models_dir):
    async with serve_app(make_settings(models_dir, warmup=False)) as c:
        student = c.engine.registry.models["tiny-student"].model

        def broken(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        student.transformer.forward = broken  # the failure a GPU kernel can produce at run time
        body = await _gen(c, steps=1)
    assert (body["served_by"], body["fallback_reason"]) == ("tiny-teacher", "student_error")
    assert len(body["images"]) == 1


async def test_readyz_is_ready_when_everything_loads(models_dir, tmp_path):
    for name in ("tiny-teacher", "tiny-student"):
        shutil.copytree(models_dir / name, tmp_path / name)
    async with serve_app(make_settings(tmp_path)) as c:
        assert (await c.get("/readyz")).text == "ready"


async def test_nothing_servable_starts_anyway_and_answers_503(models_dir, tmp_path):
    shutil.copytree(models_dir / "tiny-broken", tmp_path / "tiny-broken")
    async with serve_app(make_settings(tmp_path, default_model=None)) as c:
        assert (await c.get("/healthz")).status_code == 200
        ready = await c.get("/readyz")
        assert ready.status_code == 503 and "tiny-broken" in ready.text
        r = await c.post("/v1/generate", json={"prompt": "a red 7 on black"})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "model_unavailable"


def _evaluation(fd_by_steps: dict[int, float]) -> dict:
    """A card's ``evaluation`` as `fewstep eval --write-card` records it: every count measured and passing."""
    rows = [
        {"steps": k, "digit_accuracy": 0.9, "fg_accuracy": 0.9, "bg_accuracy": 0.9, "fd": fd, "ms_per_image": 1.0}
        for k, fd in fd_by_steps.items()
    ]
    return {
        "n": 64,
        "guidance": 1.0,
        "real_floor_fd": 1.0,
        "judge": {"name": "tiny-classifier", "sha256": "0" * 64},
        "data": "synthetic",
        "device": "cpu",
        "rows": rows,
        "min_accuracy": 0.5,
        "serves_steps": sorted(fd_by_steps),
        "command": "fewstep eval --write-card",
    }


async def test_unnamed_requests_go_to_the_student_that_serves_their_steps(models_dir, tmp_path):
    for name in ("tiny-teacher", "tiny-student"):
        shutil.copytree(models_dir / name, tmp_path / name)
    shutil.copytree(models_dir / "tiny-student", tmp_path / "tiny-one")
    card = json.loads((tmp_path / "tiny-one" / "card.json").read_text())
    card["name"] = "tiny-one"
    card["sampling"]["timesteps"] = {"1": [1.0, 0.0]}
    (tmp_path / "tiny-one" / "card.json").write_text(json.dumps(card))
    # two students serve 4 steps: the one whose card records the better FD there wins, not the first by name
    shutil.copytree(models_dir / "tiny-student", tmp_path / "tiny-a-worse")
    for name, fd in (("tiny-a-worse", 500.0), ("tiny-student", 100.0)):
        card = json.loads((tmp_path / name / "card.json").read_text())
        card["name"] = name
        card["evaluation"] = _evaluation({1: 900.0, 2: 700.0, 4: fd})
        (tmp_path / name / "card.json").write_text(json.dumps(card))
    async with serve_app(make_settings(tmp_path, default_model="tiny-one")) as c:
        body = await _gen(c)
        assert (body["served_by"], body["fallback_reason"]) == ("tiny-one", None)
        body = await _gen(c, steps=4)  # tiny-one lacks 4 steps; tiny-student has them
        assert (body["served_by"], body["steps"], body["fallback_reason"]) == ("tiny-student", 4, None)
        body = await _gen(c, model="tiny-one", steps=4)  # a named model is honoured: its teacher answers
        assert (body["served_by"], body["fallback_reason"]) == ("tiny-teacher", "steps_unsupported")
        body = await _gen(c, steps=8)  # no student has 8 steps
        assert (body["served_by"], body["fallback_reason"]) == ("tiny-teacher", "steps_unsupported")
