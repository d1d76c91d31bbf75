"""CPU throughput mode (server/streams.py): when it turns on and off, how many threads each batch gets, and an engine
that runs two batches at once on two device threads under a backlog and one batch over every thread otherwise."""

import asyncio
import base64
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.server.streams import Streams, next_mode, use_threads
from tests.serving import make_settings, serve_app


@pytest.mark.parametrize(
    "throughput, queued, streams, expected",
    [
        (False, 63, 2, False),  # under a full batch per stream: latency mode
        (False, 64, 2, True),  # a full batch (32) for each of 2 streams: throughput mode
        (True, 40, 2, True),  # between the thresholds: the mode stays
        (False, 40, 2, False),
        (True, 32, 2, True),  # one full batch left: still worth a second stream
        (True, 31, 2, False),  # less than one batch: back to latency mode
        (False, 96, 3, True),
        (False, 95, 3, False),
        (False, 10_000, 1, False),  # one stream: never
        (True, 10_000, 1, False),
    ],
)
def test_the_mode_follows_the_queued_whole_batch_work(throughput, queued, streams, expected):
    assert next_mode(throughput, queued, 32, streams) is expected


@pytest.mark.parametrize(
    "setting, device, threads, count, per_stream",
    [
        (0, "cpu", 2, 2, 1),  # automatic: two streams on two threads
        (0, "cpu", 8, 2, 4),
        (0, "cpu", 1, 1, 1),  # one thread: nothing to split
        (0, "cpu", 3, 1, 3),  # automatic needs an even count: no thread idles in the mode
        (1, "cpu", 8, 1, 8),  # off
        (4, "cpu", 8, 4, 2),
        (4, "cpu", 2, 2, 1),  # never more streams than threads
        (0, "cuda", 16, 1, 16),  # a GPU runs the batch, not the host's cores
        (4, "cuda", 16, 1, 16),
    ],
)
def test_streams_resolve_from_the_setting_the_device_and_the_threads(setting, device, threads, count, per_stream):
    streams = Streams.resolve(setting, torch.device(device), threads)
    assert (streams.count, streams.threads, streams.per_stream) == (count, threads, per_stream)


def test_use_threads_sets_only_the_calling_threads_count():
    """What throughput mode relies on: OpenMP's thread count is per thread, so a helper stream's 1 does not
    change the main device thread's count."""
    mine = torch.get_num_threads()
    seen = {}

    def helper():
        use_threads(1)
        seen["helper"] = torch.get_num_threads()

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    try:
        assert seen["helper"] == 1
        assert torch.get_num_threads() == mine
    finally:
        torch.set_num_threads(mine)  # new threads start from the last count set anywhere: restore it


def _pixels(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]["b64"]))), dtype=np.int16)


@pytest.mark.anyio
async def test_a_backlog_runs_two_batches_at_once_and_light_load_one_over_every_thread(models_dir):
    settings = make_settings(models_dir, warmup=False, max_batch=4, cpu_streams=2, threads=2, max_wait_ms=2)
    async with serve_app(settings) as c:
        engine = c.engine
        assert engine.streams == Streams(2, 2) and len(engine.helpers) == 1
        batches = []  # (device thread, its torch threads, start, end, images)
        run_batch = engine._run_batch

        def recorded(batch, threads=None):
            start = time.perf_counter()
            out = run_batch(batch, threads)
            end = time.perf_counter()
            batches.append((threading.current_thread().name, torch.get_num_threads(), start, end, len(batch)))
            return out

        engine._run_batch = recorded
        payloads = [{"prompt": f"a red {i % 10} on black", "seed": i, "steps": 1} for i in range(24)]
        responses = await asyncio.gather(*(c.post("/v1/generate", json=p) for p in payloads))
        assert [r.status_code for r in responses] == [200] * 24

        helper = [b for b in batches if b[0].startswith("fewstep-device-1")]
        main = [b for b in batches if not b[0].startswith("fewstep-device-1")]
        assert helper and main, batches  # 24 one-image jobs, batches of 4: a backlog of two batches and more
        assert all(b[1] == 1 for b in helper)  # a throughput stream has its share of the threads
        # a helper batch ran while a main-thread batch did, and never beside one over every thread
        overlapping = [(h, m) for h in helper for m in main if h[2] < m[3] and m[2] < h[3]]
        assert overlapping and all(m[1] == 1 for _, m in overlapping)

        for _ in range(100):  # the last batch's end turns the mode off
            if not engine.throughput:
                break
            await asyncio.sleep(0.01)
        assert not engine.throughput
        assert "fewstep_device_streams 1.0" in (await c.get("/metrics")).text

        batches.clear()
        alone = await c.post("/v1/generate", json=payloads[5])
        assert alone.status_code == 200 and alone.json()["batch_images"] == 1
        assert len(batches) == 1 and not batches[0][0].startswith("fewstep-device-1")
        assert batches[0][1] == 2  # light load: one batch over every thread again
        # whichever stream and thread count made it, a seed's image is the same (within 1/255, as across batches)
        assert np.abs(_pixels(alone.json()) - _pixels(responses[5].json())).max() <= 1


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The engine's device threads set torch's thread count, which new threads start from: restore it."""
    mine = torch.get_num_threads()
    yield
    torch.set_num_threads(mine)


@pytest.mark.anyio
async def test_only_whole_batches_of_a_reentrant_model_may_run_on_a_throughput_stream(models_dir):
    from fewstep.server.engine import Job

    async with serve_app(make_settings(models_dir, warmup=False, cpu_streams=2, threads=2)) as c:
        engine = c.engine

        def job(model: str, steps: int) -> Job:
            return Job(model=model, requested=model, prompt="a 7", steps=steps, guidance=None, seeds=[0])

        assert engine._streamable(job("tiny-student", 1))
        assert not engine._streamable(job("tiny-teacher", 20))  # step by step: the main device thread's
        assert not engine._streamable(job("no-such-model", 1))


@pytest.mark.anyio
async def test_a_throughput_batch_counts_its_share_of_the_device_in_the_cost_per_image_step(models_dir):
    settings = make_settings(models_dir, warmup=False, cpu_streams=2, threads=2)
    async with serve_app(settings) as c:
        engine = c.engine
        engine.cost_s.pop("tiny-student", None)
        engine._observe_cost("tiny-student", 0.8, 4, 2, threads=1)  # 0.8 s on half the cores for 8 image-steps
        assert engine.cost_s["tiny-student"] == pytest.approx(0.05)
        engine._observe_cost("tiny-student", 0.4, 4, 2, threads=2)  # all the cores: 0.05 s per image-step
        assert engine.cost_s["tiny-student"] == pytest.approx(0.05)
        # 3 threads in 2 streams of 1 (one idles): a throughput batch had half of what the mode uses, not a third
        engine.streams = Streams(2, 3)
        engine.cost_s.pop("tiny-student")
        engine._observe_cost("tiny-student", 0.8, 4, 2, threads=1)
        assert engine.cost_s["tiny-student"] == pytest.approx(0.05)


def _jobs(n: int, model: str = "tiny-student", steps: int = 1):
    from fewstep.server.engine import Job

    return [Job(model=model, requested=model, prompt="a 7", steps=steps, guidance=None, seeds=[i]) for i in range(n)]


@pytest.mark.anyio
async def test_the_queued_work_that_counts_for_the_mode_follows_arrivals_takes_and_cancels(models_dir):
    from fewstep.server.api import create_app

    engine = create_app(make_settings(models_dir, warmup=False, cpu_streams=2, threads=2, max_batch=4)).state.engine
    engine._wake, engine._helper_wake = asyncio.Event(), asyncio.Event()  # not started: nothing takes the jobs
    students, teacher = _jobs(9), _jobs(2, "tiny-teacher", 20)
    for job in students + teacher:
        engine.submit(job)
    assert engine._whole_images == 9  # the teacher's step-wise jobs do not count
    assert engine._helper_wake.is_set()  # 9 >= 2 streams x max_batch 4: a throughput stream may start
    engine.cancel(students[0])
    assert engine._whole_images == 8
    assert engine._update_mode() and engine.throughput  # a batch for each stream: on
    batch = engine._take_batch(whole_only=True)
    assert len(batch) == 4 and all(j.model == "tiny-student" for j in batch) and engine._whole_images == 4
    assert engine._update_mode()  # one batch left: still on
    engine.cancel(students[5])
    assert engine._whole_images == 3 and not engine._update_mode()  # under one batch: off


@pytest.mark.anyio
async def test_a_throughput_stream_starts_after_the_warm_up_and_never_beside_a_batch_over_every_thread(models_dir):
    from fewstep.server.api import create_app

    engine = create_app(make_settings(models_dir, warmup=False, cpu_streams=2, threads=2, max_batch=4)).state.engine
    engine._wake, engine._helper_wake = asyncio.Event(), asyncio.Event()
    jobs = _jobs(8)
    futures = [engine.submit(j) for j in jobs]

    async def stream() -> None:  # the helper batcher, as the engine's supervisor runs it
        while True:
            await engine._next_helper_batch(0)

    helper = asyncio.create_task(stream())
    try:
        await asyncio.sleep(0.2)
        assert len(engine.queue) == 8  # not warmed up yet: the helper waits
        engine._main_width = 2  # the main device thread runs a batch over both threads
        engine.warmed_up = True
        engine._helper_wake.set()
        await asyncio.sleep(0.2)
        assert len(engine.queue) == 8  # it waits for that batch to end
        engine._main_width = 0
        engine._helper_wake.set()
        await asyncio.wait_for(asyncio.gather(*futures[:4]), 60)  # the helper's batch: the first four
        assert all(f.result().batch_images == 4 for f in futures[:4])
        assert engine.metrics.device_streams._value.get() == 2
    finally:
        helper.cancel()
        for executor in engine.helpers:
            executor.shutdown(wait=True)


@pytest.mark.anyio
async def test_a_student_whose_teacher_cannot_run_on_two_threads_stays_on_the_main_one(models_dir):
    from fewstep.server.api import create_app

    engine = create_app(make_settings(models_dir, warmup=False, cpu_streams=2, threads=2)).state.engine
    [student] = _jobs(1)
    assert engine._streamable(student)
    # a failing student's batch is regenerated by its teacher on the same thread: a teacher that is not
    # reentrant (a diffusers pipeline) keeps its students' batches on the main device thread
    engine.registry.models["tiny-teacher"].model.reentrant = False
    assert not engine._streamable(student)


@pytest.mark.parametrize(
    "sizes, parts, expected",
    [
        ([1] * 32, 2, [16, 16]),
        ([8, 8, 8, 8], 2, [16, 16]),
        ([1] * 7, 2, [3, 4]),  # odd: as even as whole jobs allow
        ([20] + [1] * 12, 2, [20, 12]),  # a job is never cut
        ([8, 8, 8, 8, 1], 2, [16, 17]),  # the cut nearest the share, not the first past it (24 + 9)
        ([8, 8, 8], 2, [8, 16]),
        ([32], 2, [32]),  # one job: nothing to split
        ([1, 31], 2, [1, 31]),
        ([1] * 9, 3, [3, 3, 3]),
        ([1] * 4, 1, [4]),
    ],
)
def test_split_batch_cuts_between_jobs_into_parts_of_about_equal_images(sizes, parts, expected):
    from fewstep.server.streams import split_batch

    out = split_batch(sizes, parts, images=lambda n: n)
    assert [sum(p) for p in out] == expected
    assert [n for p in out for n in p] == sizes  # order kept, nothing lost


def _engine(models_dir, **overrides):
    """An engine that is not started (nothing takes jobs on its own), warmed up: the tests drive its slices."""
    from fewstep.server.api import create_app

    settings = make_settings(models_dir, warmup=False, cpu_streams=2, threads=2, max_batch=8, **overrides)
    engine = create_app(settings).state.engine
    engine._wake, engine._helper_wake = asyncio.Event(), asyncio.Event()
    engine.warmed_up = True
    return engine


def _shut(engine) -> None:
    for executor in (engine.executor, *engine.helpers):
        executor.shutdown(wait=True)


async def _whole_batch(engine, n: int = 8):
    futures = [engine.submit(job) for job in _jobs(n)]
    await engine._whole(engine._take_batch())
    await asyncio.gather(*futures, return_exceptions=True)
    return [f.exception() or f.result() for f in futures]


@pytest.mark.anyio
async def test_a_large_whole_batch_runs_split_over_the_streams_each_part_single_threaded(models_dir):
    split, whole = _engine(models_dir, cpu_split_images=4), _engine(models_dir, cpu_split_images=0)
    parts = []  # (device thread, its torch threads, seeds)
    run_batch = split._run_batch
    both = threading.Barrier(2, timeout=60)  # broken (the part fails) unless the two parts run at once

    def recorded(batch, threads=None, breaker=True):
        both.wait()
        out = run_batch(batch, threads, breaker)
        parts.append((threading.current_thread().name, torch.get_num_threads(), [s for j in batch for s in j.seeds]))
        return out

    split._run_batch = recorded
    try:
        results = await _whole_batch(split)
        alone = await _whole_batch(whole)
    finally:
        _shut(split)
        _shut(whole)
    assert sorted(p[0] for p in parts) == ["fewstep-device-1_0", "fewstep-device_0"]
    assert [p[1] for p in parts] == [1, 1]  # each part single-threaded: no OpenMP barrier between the cores
    assert sorted(p[2] for p in parts) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # every request gets its own images, whichever part made them, as the unsplit batch would have made them
    assert [r.seeds for r in results] == [[i] for i in range(8)]
    assert [r.batch_images for r in results] == [4] * 8 and [r.batch_images for r in alone] == [8] * 8
    for r, a in zip(results, alone, strict=True):
        diff = np.abs(np.asarray(r.images[0], np.int16) - np.asarray(a.images[0], np.int16))
        assert diff.max() <= 1


@pytest.mark.anyio
async def test_a_split_part_that_fails_outside_the_model_fails_only_its_own_requests(models_dir):
    from fewstep.server.engine import BatchFailed

    engine = _engine(models_dir, cpu_split_images=4)
    run_batch = engine._run_batch

    def broken(batch, threads=None, breaker=True):
        if batch[0].seeds == [0]:
            raise RuntimeError("a bug outside the model calls")
        return run_batch(batch, threads, breaker)

    engine._run_batch = broken
    try:
        results = await _whole_batch(engine)
    finally:
        _shut(engine)
    assert all(isinstance(r, BatchFailed) for r in results[:4])
    assert [r.seeds for r in results[4:]] == [[4], [5], [6], [7]]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "case, parts",
    [
        ("split", 2),
        ("under the images per stream", 1),
        ("jobs that do not split evenly enough", 1),
        ("setting 0", 1),
        ("before the warm-up", 1),
        ("a stream's batch in flight", 1),
        ("step by step", 1),
    ],
)
async def test_a_batch_is_split_only_when_it_runs_over_every_thread_and_is_large_enough(models_dir, case, parts):
    engine = _engine(models_dir, cpu_split_images=0 if case == "setting 0" else 4)
    jobs = _jobs(7 if case == "under the images per stream" else 8)
    if case == "jobs that do not split evenly enough":  # 6 + 1 + 1: parts of 6 and 2, under 4 images each
        jobs = _jobs(3)
        jobs[0].seeds = list(range(100, 106))
    if case == "step by step":
        jobs = _jobs(8, "tiny-teacher", 20)
    for job in jobs:
        engine.submit(job)
    engine.warmed_up = case != "before the warm-up"
    if case == "a stream's batch in flight":
        engine._helping.add(asyncio.get_running_loop().create_future())
    engine._main_width = engine._main_threads()  # as _whole sets it
    try:
        assert len(engine._split(engine._take_batch())) == parts
    finally:
        _shut(engine)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="thread names are read from Linux's /proc")
@pytest.mark.parametrize("name, shown", [("fewstep-device", "fewstep-dev"), ("fewstep-device-1", "fewstep-dev-1")])
def test_a_device_thread_carries_its_name_where_the_os_shows_it(name, shown):
    """benchmarks/reliability.py tells the device threads' CPU from the event loop's by these names."""
    from fewstep.server.engine import device_executor

    executor = device_executor(name)
    try:
        comm = executor.submit(lambda: Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text()).result()
    finally:
        executor.shutdown(wait=True)
    assert comm.strip() == shown


@pytest.mark.anyio
async def test_a_split_batch_of_a_failing_student_counts_once_for_its_circuit_breaker(models_dir):
    """Its parts fail on two threads; the breaker hears of one failed batch, as it would of the batch unsplit (and
    a healthy split batch is one success)."""
    engine = _engine(models_dir, cpu_split_images=4)
    calls = []
    record_failure, record_success = engine.breaker.record_failure, engine.breaker.record_success
    engine.breaker.record_failure = lambda name: (calls.append(("failure", name)), record_failure(name))
    engine.breaker.record_success = lambda name: (calls.append(("success", name)), record_success(name))
    try:
        healthy = await _whole_batch(engine)
        assert all(r.served_by == "tiny-student" for r in healthy) and calls == [("success", "tiny-student")]
        calls.clear()
        student = engine.registry.models["tiny-student"].model
        generate = student.generate
        student.generate = lambda *a, **kw: generate(*a, **kw) * float("nan")  # non-finite: the teacher redoes it
        try:
            results = await _whole_batch(engine)
        finally:
            student.generate = generate
    finally:
        _shut(engine)
    assert all(r.served_by == "tiny-teacher" and r.fallback_reason == "student_error" for r in results)
    assert calls == [("failure", "tiny-student")]
