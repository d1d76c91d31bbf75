"""The engine under load: batching, the bounded queue and timeouts in-process through httpx's ASGITransport;
a client that hangs up through a real uvicorn server (a disconnect needs a socket)."""

import asyncio
import base64
import contextlib
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving import LiveServer, make_settings, serve_app


async def _many(c, payloads):
    return await asyncio.gather(*(c.post("/v1/generate", json=p) for p in payloads))


@pytest.mark.anyio
async def test_concurrent_requests_form_batches(models_dir):
    async with serve_app(make_settings(models_dir, max_wait_ms=300, max_batch=8, warmup=False)) as c:
        payloads = [{"prompt": f"a red {i} on black", "seed": i, "steps": 1} for i in range(8)]
        responses = await _many(c, payloads)
        alone = (await c.post("/v1/generate", json=payloads[3])).json()
    bodies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses)
    assert max(b["batch_images"] for b in bodies) > 1
    assert alone["batch_images"] == 1

    # batched or alone, the image is the same (within 1/255; here bit-identical PNGs are typical)
    def arr(b64):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)

    assert np.abs(arr(bodies[3]["images"][0]["b64"]) - arr(alone["images"][0]["b64"])).max() <= 1


@pytest.mark.anyio
async def test_a_full_queue_answers_429_with_retry_after(models_dir):
    settings = make_settings(models_dir, queue_size=1, max_batch=1, warmup=False, retry_after_s=2)
    async with serve_app(settings) as c:
        # the teacher at 100 steps is slow enough to keep the device busy while the rest arrive
        payloads = [{"prompt": "a red 7 on black", "model": "tiny-teacher", "steps": 100, "seed": i} for i in range(6)]
        responses = await _many(c, payloads)
    codes = [r.status_code for r in responses]
    assert 429 in codes and 200 in codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "2" and limited.json()["error"]["code"] == "queue_full"


@pytest.mark.anyio
async def test_a_slow_request_times_out_with_504(models_dir):
    async with serve_app(make_settings(models_dir, request_timeout_s=0.05, warmup=False)) as c:
        r = await c.post("/v1/generate", json={"prompt": "a red 7 on black", "model": "tiny-teacher", "steps": 100})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


@pytest.mark.slow
@pytest.mark.parametrize("lifecycle", [True, False], ids=["fewstep-serve", "plain-uvicorn"])
def test_a_disconnected_client_is_dropped_before_it_runs(models_dir, lifecycle):
    """Under ``fewstep serve`` the connection reports its own loss (serving.DISCONNECT); under plain uvicorn a task
    waits for the disconnect message. Either way the job leaves the queue unrun."""
    # step scheduling off: the second teacher request (another guidance: another batch) waits behind the first
    # (on, it would start its own running batch at once; test_step_scheduling.py covers leaving one)
    settings = make_settings(models_dir, max_batch=8, warmup=False, step_scheduling=False)
    with LiveServer(settings, lifecycle=lifecycle) as server:

        async def queue_depth(c) -> float:
            for line in (await c.get("/metrics")).text.splitlines():
                if line.startswith("fewstep_queue_depth_requests "):
                    return float(line.split()[1])
            return 0.0

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                # keeps the device busy: 8 teacher images at 100 steps
                busy = asyncio.create_task(
                    c.post(
                        "/v1/generate",
                        json={
                            "prompt": "a red 7 on black",
                            "model": "tiny-teacher",
                            "steps": 100,
                            "n": 8,
                            "guidance": 2.5,
                        },
                    )
                )
                while await queue_depth(c) > 0 or not server.engine.executor._work_queue.empty():
                    await asyncio.sleep(0.01)
                async with httpx.AsyncClient(base_url=server.url, timeout=120) as impatient:
                    gone = asyncio.create_task(
                        impatient.post(
                            "/v1/generate",
                            json={
                                "prompt": "a blue 1 on white",
                                "model": "tiny-teacher",
                                "steps": 100,
                                "guidance": 3.5,
                            },
                        )
                    )
                    while await queue_depth(c) < 1:  # queued behind the busy batch
                        await asyncio.sleep(0.01)
                    gone.cancel()  # the client hangs up
                    with contextlib.suppress(asyncio.CancelledError):
                        await gone
                return await busy

        first = asyncio.run(scenario())
        assert first.status_code == 200
        with server.client() as c:
            for _ in range(200):
                text = c.get("/metrics").text
                if 'type="dropped_before_run"' in text and 'type="client_disconnected"' in text:
                    break
                asyncio.run(asyncio.sleep(0.05))
    assert 'fewstep_errors_total{type="client_disconnected"} 1.0' in text
    assert 'fewstep_errors_total{type="dropped_before_run"} 1.0' in text
    # the abandoned job never ran: only the busy request's 8 images were generated
    assert 'fewstep_images_generated_total{model="tiny-teacher"} 8.0' in text


@pytest.mark.anyio
async def test_submit_returns_the_jobs_future_and_cancel_drops_it_unsettled(models_dir):
    from fewstep.server.engine import Job, NotServable, QueueFull, _settle

    async with serve_app(make_settings(models_dir, warmup=False, queue_size=1)) as c:
        engine = c.engine
        job = Job(model="tiny-teacher", requested="tiny-teacher", prompt="a red 7 on black", steps=10,
                  guidance=None, seeds=[0])  # fmt: skip
        # no await below: the batcher cannot take the job in between
        future = engine.submit(job)
        assert future is job.future and not future.done() and job in engine.queue
        other = Job(model="tiny-teacher", requested="tiny-teacher", prompt="x", steps=1, guidance=None, seeds=[1])
        with pytest.raises(QueueFull):  # admission happens at submit, before anything is awaited
            engine.submit(other)
        engine.cancel(job)  # the client left
        assert future.cancelled() and job not in engine.queue
        _settle(job, NotServable("late"))  # what a batch would do with it: nothing (no unread exception)
        assert future.cancelled()


# ---- small images are encoded on the device thread; the routing snapshot is rebuilt only on a change ----------


def _result(*sizes: tuple[int, int], regenerate: list[int] | None = None):
    from fewstep.server.engine import Result

    rng = np.random.default_rng(len(sizes))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]
    return Result(images, list(range(len(images))), "m", 1, None, 0.0, 1.0, len(images), regenerate=regenerate or [])


def test_small_final_images_are_encoded_as_their_batch_ends():
    from fewstep.models.images import encode
    from fewstep.server.engine import Encoding, Job, _encoded

    def job(encoding):
        return Job(model="m", requested="m", prompt="p", steps=1, guidance=None, seeds=[0], encoding=encoding)

    small = _result((32, 32), (32, 32))
    done = _encoded(job(Encoding("png", 95, 3)), small)
    assert done.encoded == [encode(im, "png", png_level=3) for im in small.images] and done.encode_ms > 0
    webp = _encoded(job(Encoding("webp", 80, 1)), small)
    assert webp.encoded == [encode(im, "webp", quality=80) for im in small.images]
    # left to the HTTP layer: no encoding asked, images the teacher will redo, images over the pixel budget,
    # and an encoding that fails (the HTTP layer answers its error)
    assert _encoded(job(None), small).encoded is None
    assert _encoded(job(Encoding()), _result((32, 32), regenerate=[0])).encoded is None
    assert _encoded(job(Encoding()), _result((128, 128), (128, 128), (128, 128))).encoded is None
    assert _encoded(job(Encoding("gif")), small).encoded is None


@pytest.mark.anyio
async def test_a_served_png_is_the_encoding_of_its_pixels_at_the_configured_level(models_dir):
    from fewstep.models.images import small_png

    async with serve_app(make_settings(models_dir, png_compress_level=4, warmup=False)) as c:
        body = (await c.post("/v1/generate", json={"prompt": "a red 7 on black", "seed": 3, "n": 2})).json()
    for im in body["images"]:
        png = base64.b64decode(im["b64"])
        assert png == small_png(np.asarray(Image.open(io.BytesIO(png))), 4)
    assert body["timings"]["encode_ms"] > 0


def test_the_routing_snapshot_is_rebuilt_only_when_a_model_health_changes(models_dir):
    from fewstep.server.api import create_app

    engine = create_app(make_settings(models_dir, warmup=False, breaker_threshold=1, breaker_cooldown_s=5)).state.engine
    now = [100.0]
    engine.breaker.clock = lambda: now[0]
    first = engine.snapshot()
    assert engine.snapshot() is first  # nothing changed: the same snapshot
    engine.breaker.record_failure("tiny-student")  # the circuit opens
    opened = engine.snapshot()
    assert opened is not first and opened.models["tiny-student"].circuit_open
    assert engine.route("tiny-student", 1).model == "tiny-teacher"
    now[0] += 5  # the cool-down is over: the next batch is a trial, routed to the student again
    assert not engine.snapshot().models["tiny-student"].circuit_open
    assert engine.route("tiny-student", 1).model == "tiny-student"
    engine.registry.models["tiny-student"].error = "failed warm-up"  # a model's health, as the engine records it
    assert engine.snapshot().models["tiny-student"].error == "failed warm-up"


@pytest.mark.anyio
async def test_a_backlog_that_queued_while_a_batch_ran_starts_without_waiting_to_fill(models_dir):
    """A backlog of at least half a batch counts max_wait_ms from its oldest arrival (so one that queued while a
    batch ran starts at once: waiting idled the device under open-loop arrivals); fewer requests, and fresh
    ones, wait from now for company (a straggler waits for the burst behind it)."""
    import time

    from fewstep.server.api import create_app
    from fewstep.server.engine import Job

    settings = make_settings(models_dir, warmup=False, max_wait_ms=300, max_batch=8)
    engine = create_app(settings).state.engine
    engine._wake = asyncio.Event()
    engine._arrival_gap_s = 0.001  # arriving in a burst

    async def fill_wait_s(n: int, age_s: float) -> float:
        now = time.perf_counter()
        engine.queue.clear()
        engine.queue.extend(
            Job(model="tiny-student", requested="tiny-student", prompt="a 7", steps=1, guidance=None, seeds=[i],
                enqueued=now - age_s)
            for i in range(n)
        )  # fmt: skip
        await engine._fill_wait()
        return time.perf_counter() - now

    assert await fill_wait_s(4, 1.0) < 0.05  # half a batch that waited through a batch: at once
    assert await fill_wait_s(4, 0.1) < 0.25  # half a batch that waited 100 ms: only the rest of the 300
    assert 0.25 <= await fill_wait_s(4, 0.0) < 2.0  # fresh: waits for the batch to fill, up to max_wait_ms
    assert 0.25 <= await fill_wait_s(1, 1.0) < 2.0  # a straggler: waits for company from now
