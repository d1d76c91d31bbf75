"""Teacher fallback: every path, the circuit breaker, and how it shows in responses and metrics."""

import time

from tests.server.conftest import LiveServer, make_settings


def _gen(c, **kw):
    r = c.post("/v1/generate", json={"prompt": "a red 7 on black", "seed": 1, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_more_steps_than_the_student_supports_go_to_the_teacher(live):
    with live.client() as c:
        body = _gen(c, steps=12)
        assert (body["served_by"], body["steps"], body["fallback_reason"]) == ("tiny-teacher", 12, "steps_unsupported")
        body = _gen(c, steps=3)  # a count the student lacks but within its range: the teacher's default
        assert (body["served_by"], body["steps"], body["fallback_reason"]) == ("tiny-teacher", 4, "steps_unsupported")
        body = _gen(c, quality="teacher")
        assert (body["served_by"], body["fallback_reason"]) == ("tiny-teacher", "teacher_requested")
        body = _gen(c, model="tiny-teacher", steps=6)
        assert (body["served_by"], body["steps"], body["fallback_reason"]) == ("tiny-teacher", 6, None)


def test_a_student_that_failed_to_load_is_served_by_its_teacher(live):
    with live.client() as c:
        body = _gen(c, model="tiny-broken", steps=1)
        assert (body["served_by"], body["fallback_reason"]) == ("tiny-teacher", "student_unavailable")
        assert len(body["images"]) == 1


def test_a_student_that_returns_nan_is_regenerated_by_the_teacher(models_dir):
    settings = make_settings(models_dir, breaker_threshold=2, breaker_cooldown_s=1.0, warmup=False)
    with LiveServer(settings) as server, server.client() as c:
        first = _gen(c, model="tiny-nan", steps=1)
        assert (first["served_by"], first["fallback_reason"]) == ("tiny-teacher", "student_error")
        second = _gen(c, model="tiny-nan", steps=1)
        assert second["fallback_reason"] == "student_error"
        # two consecutive failures open the circuit: the student is not even tried
        third = _gen(c, model="tiny-nan", steps=1)
        assert third["fallback_reason"] == "circuit_open"
        assert "circuit open" in c.get("/readyz").text
        time.sleep(1.1)  # after the cool-down one trial batch goes to the student again
        fourth = _gen(c, model="tiny-nan", steps=1)
        assert fourth["fallback_reason"] == "student_error"
        metrics = c.get("/metrics").text
    assert 'fewstep_fallbacks_total{reason="student_error"} 3.0' in metrics
    assert 'fewstep_fallbacks_total{reason="circuit_open"} 1.0' in metrics


def test_a_student_that_raises_is_regenerated_by_the_teacher(models_dir):
    with LiveServer(make_settings(models_dir, warmup=False)) as server, server.client() as c:
        student = server.engine.registry.models["tiny-student"].model

        def broken(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        student.transformer.forward = broken  # the failure a GPU kernel can produce at run time
        body = _gen(c, steps=1)
    assert (body["served_by"], body["fallback_reason"]) == ("tiny-teacher", "student_error")
    assert len(body["images"]) == 1


def test_readyz_is_ready_when_everything_loads(models_dir, tmp_path):
    import shutil

    for name in ("tiny-teacher", "tiny-student"):
        shutil.copytree(models_dir / name, tmp_path / name)
    with LiveServer(make_settings(tmp_path)) as server, server.client() as c:
        assert c.get("/readyz").text == "ready"


def test_nothing_servable_starts_anyway_and_answers_503(models_dir, tmp_path):
    import shutil

    shutil.copytree(models_dir / "tiny-broken", tmp_path / "tiny-broken")
    with LiveServer(make_settings(tmp_path, default_model=None)) as server, server.client() as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "tiny-broken" in ready.text
        r = c.post("/v1/generate", json={"prompt": "a red 7 on black"})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "model_unavailable"


def test_unnamed_requests_go_to_the_student_that_serves_their_steps(models_dir, tmp_path):
    import json
    import shutil

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
        card["metrics"] = {"rows": [{"steps": 4, "fd": fd}]}
        (tmp_path / name / "card.json").write_text(json.dumps(card))
    with LiveServer(make_settings(tmp_path, default_model="tiny-one")) as server, server.client() as c:
        assert (_gen(c)["served_by"], _gen(c)["fallback_reason"]) == ("tiny-one", None)
        body = _gen(c, steps=4)  # tiny-one lacks 4 steps; tiny-student has them
        assert (body["served_by"], body["steps"], body["fallback_reason"]) == ("tiny-student", 4, None)
        body = _gen(c, model="tiny-one", steps=4)  # a named model is honoured: its teacher answers
        assert (body["served_by"], body["fallback_reason"]) == ("tiny-teacher", "steps_unsupported")
        body = _gen(c, steps=8)  # no student has 8 steps
        assert (body["served_by"], body["fallback_reason"]) == ("tiny-teacher", "steps_unsupported")
