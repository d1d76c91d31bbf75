"""steps: "auto" (server/engine.py plan_auto): the most steps predicted to meet the latency target, the choice and
its prediction in the response, SLO and chosen-steps metrics, and clear errors for misuse."""

import asyncio
import re

import pytest

from tests.serving import make_settings, serve_app

PROMPT = "a red 7 on black"


@pytest.mark.anyio
async def test_auto_takes_the_teacher_when_the_target_allows_and_a_student_when_not(models_dir):
    async with serve_app(make_settings(models_dir)) as c:
        roomy = await c.post("/v1/generate", json={"prompt": PROMPT, "steps": "auto", "latency_slo_ms": 600_000})
        assert roomy.status_code == 200, roomy.text
        body = roomy.json()
        candidates = body["auto"]["candidates"]
        # best first: the teacher at its default steps, then the student's counts, most steps first
        assert candidates[0]["model"] == "tiny-teacher"
        assert [x["steps"] for x in candidates[1:]] == [4, 2, 1]
        assert body["served_by"] == "tiny-teacher" and body["steps"] == candidates[0]["steps"]
        assert body["auto"]["predicted_ms"] == candidates[0]["predicted_ms"]
        # a target the 2-step student meets and neither the teacher nor the 4-step student does
        predicted = {(x["model"], x["steps"]): x["predicted_ms"] for x in candidates}
        above = min(predicted[("tiny-student", 4)], candidates[0]["predicted_ms"])
        assert predicted[("tiny-student", 2)] < above
        between = (predicted[("tiny-student", 2)] + above) / 2
        mid = (await c.post("/v1/generate", json={"prompt": PROMPT, "steps": "auto", "latency_slo_ms": between})).json()
        assert (mid["served_by"], mid["steps"]) == ("tiny-student", 2)
        # a target nothing meets: the fastest candidate, and the miss is counted
        tight = (await c.post("/v1/generate", json={"prompt": PROMPT, "steps": "auto", "latency_slo_ms": 1e-6})).json()
        assert (tight["served_by"], tight["steps"]) == ("tiny-student", 1)
        metrics = (await c.get("/metrics")).text
    # the tight target is missed; the others are predicted to be met (on a loaded machine one may miss too)
    slo = {}
    for outcome in ("met", "missed"):
        slo[outcome] = float(re.search(rf'fewstep_slo_requests_total{{outcome="{outcome}"}} (\S+)', metrics)[1])
    assert slo["missed"] >= 1 and slo["met"] + slo["missed"] == 3
    assert 'fewstep_auto_steps_total{model="tiny-student",steps="2"} 1.0' in metrics


@pytest.mark.anyio
async def test_auto_serves_fewer_steps_while_the_teacher_is_busy(models_dir):
    async with serve_app(make_settings(models_dir)) as c:
        idle = await c.post("/v1/generate", json={"prompt": PROMPT, "steps": "auto", "latency_slo_ms": 600_000})
        teacher_ms = idle.json()["auto"]["candidates"][0]["predicted_ms"]
        # a target the teacher meets on an idle server (twice its prediction) ...
        slo = 2 * teacher_ms
        busy = [asyncio.create_task(c.post("/v1/generate", json={"prompt": PROMPT, "model": "tiny-teacher",
                "steps": 100, "n": 8, "seed": i})) for i in range(3)]  # fmt: skip
        while not c.engine.running:
            await asyncio.sleep(0.001)
        loaded = await c.post("/v1/generate", json={"prompt": PROMPT, "steps": "auto", "latency_slo_ms": slo})
        await asyncio.gather(*busy)
    body = loaded.json()
    # ... is not met behind 24 teacher images at 100 steps: a student step count is chosen instead
    assert body["served_by"] == "tiny-student", body["auto"]
    assert body["auto"]["candidates"][0]["predicted_ms"] > slo


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"steps": 2, "latency_slo_ms": 100}, "latency_slo_ms"),
        ({"steps": "fast"}, "steps"),
        ({"steps": "auto", "latency_slo_ms": 0}, "latency_slo_ms"),
        ({"steps": "auto", "quality": "teacher"}, "steps"),
    ],
)
async def test_auto_misuse_is_a_400_naming_the_field(api, payload, param):
    r = await api.post("/v1/generate", json={"prompt": PROMPT, **payload})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.anyio
async def test_auto_for_a_named_teacher_runs_its_default_steps(api):
    r = (await api.post("/v1/generate", json={"prompt": PROMPT, "model": "tiny-teacher", "steps": "auto"})).json()
    assert [(c["model"], c["steps"]) for c in r["auto"]["candidates"]] == [("tiny-teacher", 4)]
    assert r["served_by"] == "tiny-teacher" and r["fallback_reason"] is None  # chosen by auto, not asked for


def test_the_prediction_correction_follows_measured_latency(models_dir):
    from fewstep.server.engine import Engine
    from fewstep.server.metrics import Metrics
    from fewstep.server.registry import Registry

    engine = Engine(Registry(), make_settings(models_dir), Metrics.create())
    engine.observe_auto(0.1, 0.3)  # took 3x the prediction: 0.9 * 1 + 0.1 * 3
    assert engine.auto_correction == pytest.approx(1.2)
    for _ in range(200):
        engine.observe_auto(0.1, 10.0)
    assert engine.auto_correction == 8.0  # bounded
