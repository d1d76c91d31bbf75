"""Step-level scheduling (server/engine.py): a student request does not wait for a running teacher batch to end,
and teacher requests join the batch already running (continuous batching) with the images they get alone."""

import asyncio
import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from tests.serving import make_settings, serve_app

TEACHER = {"prompt": "a red 7 on black", "model": "tiny-teacher", "steps": 100, "n": 8, "seed": 1}
STUDENT = {"prompt": "a blue 3 on white", "steps": 1, "seed": 2}


async def _timed(c, payload):
    r = await c.post("/v1/generate", json=payload)
    assert r.status_code == 200, r.text
    return r.json(), time.perf_counter()


async def _student_behind_teacher(settings):
    async with serve_app(settings) as c:
        teacher = asyncio.create_task(_timed(c, TEACHER))
        while not c.engine.running and c.engine._running is None:  # the teacher batch is on the device
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)
        student, student_done = await _timed(c, STUDENT)
        teacher, teacher_done = await teacher
    return student, student_done, teacher, teacher_done


@pytest.mark.anyio
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
async def test_a_student_request_runs_between_teacher_steps(models_dir, graphs):
    # with graphs, the warm-up traces them (a model's first step would also trace its graph, models/graphs.py, and
    # a step's length is what this test measures against)
    settings = make_settings(models_dir, warmup=graphs, cpu_graphs=graphs)
    student, s_done, teacher, t_done = await _student_behind_teacher(settings)
    assert student["served_by"] == "tiny-student" and teacher["served_by"] == "tiny-teacher"
    assert s_done < t_done  # it did not wait for the 100-step batch
    # it waited for at most a few teacher steps, not the batch (100 steps)
    assert student["timings"]["queue_ms"] < teacher["timings"]["inference_ms"] / 10


@pytest.mark.anyio
async def test_without_step_scheduling_the_student_waits_for_the_whole_batch(models_dir):
    settings = make_settings(models_dir, warmup=False, step_scheduling=False)
    student, s_done, teacher, t_done = await _student_behind_teacher(settings)
    assert s_done > t_done


def _pixels(body):
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(i["b64"]))), dtype=np.int16) for i in body["images"]]


@pytest.mark.anyio
async def test_teacher_requests_join_the_running_batch(models_dir):
    first = {"prompt": "a red 7 on black", "model": "tiny-teacher", "steps": 60, "n": 2, "seed": 10}
    second = {"prompt": "a green 4 on white", "model": "tiny-teacher", "steps": 60, "n": 2, "seed": 20}
    async with serve_app(make_settings(models_dir, warmup=False, max_batch=8)) as c:
        task = asyncio.create_task(_timed(c, first))
        while not c.engine.running:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # the first batch is some steps in
        joined, joined_done = await _timed(c, second)
        (_, first_done), alone = await task, (await c.post("/v1/generate", json=second)).json()
    assert joined["batch_images"] == 4  # its rows shared the steps of the running batch's
    assert alone["batch_images"] == 2
    assert first_done < joined_done  # the first batch kept its head start
    # joining at a step boundary changes nothing in the images (within 1/255)
    for a, b in zip(_pixels(joined), _pixels(alone), strict=True):
        assert np.abs(a - b).max() <= 1


@pytest.mark.anyio
async def test_a_request_that_times_out_leaves_the_running_batch(models_dir):
    # 100 steps of 8 images with CFG: about 0.5 s here, ten times the 0.05 s deadline (at n = 1 and 0.2 s, a
    # fast machine finished the whole request in time and the test saw a 200)
    async with serve_app(make_settings(models_dir, warmup=False, request_timeout_s=0.05)) as c:
        t0 = time.monotonic()
        r = await c.post("/v1/generate", json=TEACHER)
        answered_s = time.monotonic() - t0
        deadline = time.monotonic() + 30  # the next step boundary drops its rows (a loaded machine: seconds)
        while c.engine.running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        metrics = (await c.get("/metrics")).text
    assert r.status_code == 504, f"answered {r.status_code} after {answered_s:.2f} s"
    assert not c.engine.running
    assert 'fewstep_errors_total{type="dropped_in_flight"} 1.0' in metrics


@pytest.mark.anyio
async def test_a_lone_running_batch_takes_several_steps_per_device_slice(models_dir, monkeypatch):
    """Nothing else to run: up to MAX_STEPS_PER_SLICE steps per hand-off to the device thread, not one each."""
    from fewstep.server.engine import MAX_STEPS_PER_SLICE

    async with serve_app(make_settings(models_dir, warmup=False)) as c:
        slices, submit = [], c.engine.executor.submit
        monkeypatch.setattr(c.engine.executor, "submit", lambda fn, *a: slices.append(fn) or submit(fn, *a))
        r = await c.post("/v1/generate", json={**TEACHER, "n": 1})
    assert r.status_code == 200, r.text
    steps = [fn for fn in slices if getattr(fn, "__name__", "") == "_run_step"]
    assert 100 / MAX_STEPS_PER_SLICE <= len(steps) < 100 / 2


@pytest.fixture(scope="module")
def many_step_dir(models_dir, tmp_path_factory):
    """tiny-teacher, tiny-student, tiny-many (the teacher's weights as a student that serves 8 steps, as a
    guidance-distilled model serves its teacher's count) and tiny-many-nan (the same, returning NaN)."""
    import shutil

    import torch

    from fewstep.models.flow import timesteps
    from fewstep.models.pipeline import TextToImage

    root = tmp_path_factory.mktemp("many")
    for name in ("tiny-teacher", "tiny-student"):
        shutil.copytree(models_dir / name, root / name)
    teacher = TextToImage.load(root / "tiny-teacher", kernels="torch")
    sampling = {"default_steps": 8, "sampler": "euler", "any_steps": False, "max_steps": 8,
                "timesteps": {"8": timesteps(8)}, "guidance": 1.0}  # fmt: skip
    lineage = {"role": "student", "parameterization": "velocity", "sampling": sampling,
               "teacher": {"name": "tiny-teacher", "sha256": teacher.weights_sha256()}}  # fmt: skip
    teacher.save(root / "tiny-many", {"name": "tiny-many", **lineage}, dtype="float32")
    with torch.no_grad():
        teacher.transformer.final_layer.linear.bias.fill_(float("nan"))
    teacher.save(root / "tiny-many-nan", {"name": "tiny-many-nan", **lineage}, dtype="float32")
    return root


def _slices(engine, monkeypatch) -> list[str]:
    names, submit = [], engine.executor.submit
    monkeypatch.setattr(engine.executor, "submit", lambda fn, *a: names.append(fn.__name__) or submit(fn, *a))
    return names


@pytest.mark.anyio
async def test_a_many_step_student_runs_step_by_step_with_the_images_of_a_whole_batch(many_step_dir, monkeypatch):
    payload = {"prompt": "a red 7 on black", "model": "tiny-many", "n": 2, "seed": 5}
    async with serve_app(make_settings(many_step_dir, warmup=False, max_batch=8)) as c:
        slices = _slices(c.engine, monkeypatch)
        stepped = await c.post("/v1/generate", json=payload)
    assert stepped.status_code == 200, stepped.text
    assert "_run_step" in slices and "_run_batch" not in slices
    async with serve_app(make_settings(many_step_dir, warmup=False, step_scheduling=False)) as c:
        whole = await c.post("/v1/generate", json=payload)
    assert stepped.json()["served_by"] == whole.json()["served_by"] == "tiny-many" and stepped.json()["steps"] == 8
    for a, b in zip(_pixels(stepped.json()), _pixels(whole.json()), strict=True):
        assert np.abs(a - b).max() <= 1


@pytest.mark.anyio
async def test_a_failing_many_step_student_is_served_by_its_teacher_step_by_step(many_step_dir, monkeypatch):
    settings = make_settings(many_step_dir, warmup=False, breaker_threshold=2)
    async with serve_app(settings) as c:
        slices = _slices(c.engine, monkeypatch)
        bodies = []
        for seed in range(3):
            payload = {"prompt": "a red 7 on black", "model": "tiny-many-nan", "seed": seed}
            r = await c.post("/v1/generate", json=payload)
            assert r.status_code == 200, r.text
            bodies.append(r.json())
    assert [b["served_by"] for b in bodies] == ["tiny-teacher"] * 3
    assert [b["fallback_reason"] for b in bodies] == ["student_error", "student_error", "circuit_open"]
    assert slices[0] == "_run_step"  # the student ran step by step; its teacher (4 steps) regenerated whole
