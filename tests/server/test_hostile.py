"""Input the parser, the schema or the limits cannot take: a 4xx in the error shape, a short message, never a
5xx; bounded metric labels; rejection before parsing; a supervised batcher; the scheduling order."""

import asyncio
import json
import random
import re

import httpx
import pytest

from fewstep.server.engine import Job
from tests.serving import LiveServer, make_settings, serve_app

pytestmark = pytest.mark.anyio
OK = {"prompt": "a red 7 on black", "steps": 1, "seed": 1}


def _raw(body: bytes) -> dict:
    return {"content": body, "headers": {"content-type": "application/json"}}


HOSTILE = [
    ("nested arrays", _raw(b"[" * 10_000 + b"]" * 10_000), 400, "invalid_json"),
    ("nested objects", _raw(b'{"a":' * 10_000 + b"1" + b"}" * 10_000), 400, "invalid_json"),
    ("5000-digit seed", _raw(b'{"prompt": "a 7", "seed": ' + b"1" * 5000 + b"}"), 400, "invalid_json"),
    ("4301-digit steps", _raw(b'{"prompt": "a 7", "steps": ' + b"9" * 4301 + b"}"), 400, "invalid_json"),
    ("long float", _raw(b'{"prompt": "a 7", "guidance": 1.' + b"5" * 500 + b"}"), 400, "invalid_json"),
    ("NaN literal", _raw(b'{"prompt": "a 7", "guidance": NaN}'), 400, "invalid_json"),
    ("Infinity literal", _raw(b'{"prompt": "a 7", "guidance": Infinity}'), 400, "invalid_json"),
    ("invalid UTF-8", _raw(b'{"prompt": "\xff\xfe a 7"}'), 400, "invalid_json"),
    ("not JSON", _raw(b"prompt=a 7"), 400, "invalid_json"),
    ("a JSON array", {"json": [OK]}, 400, "invalid_value"),
    ("a JSON string", {"json": "a 7"}, 400, "invalid_value"),
    ("steps true", {"json": {**OK, "steps": True}}, 400, "invalid_value"),
    ("steps '4'", {"json": {**OK, "steps": "4"}}, 400, "invalid_value"),
    ("steps 4.0", {"json": {**OK, "steps": 4.0}}, 400, "invalid_value"),
    ("seed '12'", {"json": {**OK, "seed": "12"}}, 400, "invalid_value"),
    ("guidance true", {"json": {**OK, "guidance": True}}, 400, "invalid_value"),
    ("n 0", {"json": {**OK, "n": 0}}, 400, "invalid_value"),
    ("n -1", {"json": {**OK, "n": -1}}, 400, "invalid_value"),
    ("model path", {"json": {**OK, "model": "../../etc/passwd"}}, 400, "invalid_value"),
    ("5 KB model", {"json": {**OK, "model": "m" * 5000}}, 400, "invalid_value"),
    ("unknown field", {"json": {**OK, "colour": "red"}}, 400, "invalid_value"),
    ("empty body", _raw(b""), 400, "invalid_value"),
    ("duplicate key", _raw(b'{"prompt": "a 7", "steps": 1, "steps": 2}'), 400, "invalid_json"),
    ("3000-character field name", {"json": {**OK, "f" * 3000: 1}}, 400, "invalid_value"),
    ("5 KB content-type", {"content": b"{}", "headers": {"content-type": "text/" + "x" * 5000}}, 415,
     "unsupported_media_type"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "request_kw", "status", "code"), HOSTILE, ids=[c[0] for c in HOSTILE])
async def test_hostile_bodies_are_clear_4xx(api, case, request_kw, status, code):
    r = await api.post("/v1/generate", **request_kw)
    assert r.status_code == status, (case, r.text[:300])
    err = r.json()["error"]
    assert err["code"] == code, err
    assert len(err["message"]) < 200, err["message"][:300]  # never an echo of the long value
    assert (await api.post("/v1/generate", json=OK)).status_code == 200


async def test_openai_route_says_404_for_an_unknown_model_before_anything_else(api):
    r = await api.post("/v1/images/generations", json={"prompt": "a 7", "model": "nobody", "size": "1024x1024"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = await api.post("/v1/images/generations", json={"prompt": "a 7", "size": "9" * 3000})
    assert r.status_code == 400 and len(r.json()["error"]["message"]) < 200


async def test_openapi_describes_the_request_bodies(api):
    spec = (await api.get("/openapi.json")).json()
    for path, model in (("/v1/generate", "GenerateRequest"), ("/v1/images/generations", "ImagesRequest")):
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith(model)
    assert spec["components"]["schemas"]["GenerateRequest"]["properties"]["steps"]


def _series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("fewstep_") and not line.startswith("#"))


async def test_metric_labels_are_bounded(api):
    rng = random.Random(0)

    async def made_up_values(k: int) -> str:
        for i in range(k):
            await api.post("/v1/generate", json={**OK, "model": f"made-up-{rng.randrange(10**9)}"})
            await api.post("/v1/generate", json={**OK, "steps": 101 + rng.randrange(10**6)})
            await api.post("/v1/generate", json={**OK, "model": "tiny-teacher", "steps": 3 + i % 40})
        return (await api.get("/metrics")).text

    first = await made_up_values(40)
    assert "made-up" not in first
    assert set(re.findall(r'steps="([^"]*)"', first)) <= {"1", "2", "4", "40", "other"}  # served counts only
    again = await made_up_values(40)  # 120 more distinct client values add no series at all
    assert _series(again) == _series(first)


async def test_a_saturated_server_refuses_before_reading_the_body(models_dir):
    async with serve_app(make_settings(models_dir)) as client:
        client.engine.saturated = lambda: True
        r = await client.post("/v1/generate", **_raw(b"this is not even JSON"))
        assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
        assert 'fewstep_rejected_total{path="app"} 1.0' in (await client.get("/metrics")).text


async def test_admission_counts_work(models_dir):
    """A teacher job of 100 steps × 8 images fills the work budget: cheap jobs still fit, expensive ones do not."""
    settings = make_settings(models_dir, max_queued_work_s=1.0, max_n=8)
    async with serve_app(settings) as client:
        engine = client.engine
        engine.cost_s.update({"tiny-teacher": 0.5, "tiny-student": 0.001})
        gate = asyncio.Event()
        real = engine._next_batch

        async def held():  # hold the batcher so that jobs stay queued
            await gate.wait()
            await real()

        engine._next_batch = held
        engine._task.cancel()  # the supervisor restarts it with the held loop
        await asyncio.sleep(0.05)
        first = asyncio.ensure_future(client.post("/v1/generate", json={**OK, "model": "tiny-teacher", "steps": 5}))
        await asyncio.sleep(0.1)
        assert engine.queued_work_s == pytest.approx(2.5)
        big = await client.post("/v1/generate", json={**OK, "model": "tiny-teacher", "steps": 2})
        assert big.status_code == 429 and int(big.headers["retry-after"]) >= 3
        gate.set()
        assert (await first).status_code == 200
        engine._next_batch = real


def test_cheap_work_overtakes_expensive_work_without_starving_it():
    teacher = Job("t", "t", "a", 100, None, [0] * 8, cost_s=5.0, enqueued=0.0)
    cheap = Job("s", "s", "a", 1, None, [0], cost_s=0.02, enqueued=0.2)
    late = Job("s", "s", "b", 1, None, [0], cost_s=0.02, enqueued=6.0)
    order = sorted([teacher, cheap, late], key=lambda j: j.priority)
    assert order == [cheap, teacher, late]


async def test_an_error_outside_the_models_fails_only_its_batch(models_dir, monkeypatch):
    from fewstep.server import engine as engine_module

    async with serve_app(make_settings(models_dir)) as client:
        real = engine_module.to_pil
        calls = []

        def broken_once(images):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real(images)

        monkeypatch.setattr(engine_module, "to_pil", broken_once)
        r = await client.post("/v1/generate", json=OK)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert (await client.post("/v1/generate", json=OK)).status_code == 200


async def test_the_batcher_is_restarted_if_it_ever_stops(models_dir):
    async with serve_app(make_settings(models_dir)) as client:
        engine = client.engine
        engine._task.cancel()
        await asyncio.sleep(0.05)
        assert engine.batcher_restarts == 1 and not engine._task.done()
        assert (await client.post("/v1/generate", json=OK)).status_code == 200
        assert "batcher_restart" in (await client.get("/metrics")).text


async def test_a_default_student_that_fails_warm_up_gives_up_its_step_counts(models_dir):
    """tiny-nan loads, then fails its warm-up (non-finite output): unnamed 1-step requests go to the healthy
    student, not to the 40-step teacher."""
    async with serve_app(make_settings(models_dir, default_model="tiny-nan")) as client:
        r = await client.post("/v1/generate", json=OK)
        assert r.status_code == 200 and r.json()["served_by"] == "tiny-student", r.json()
        assert "tiny-nan: warm-up failed" in (await client.get("/readyz")).text


@pytest.mark.slow
def test_the_keep_alive_connection_survives_hostile_bodies(models_dir):
    with LiveServer(make_settings(models_dir)) as server, server.client() as c:
        for _, kw, status, _ in HOSTILE[:9]:
            assert c.post("/v1/generate", **kw).status_code == status
            r = c.post("/v1/generate", json=OK)  # the same pooled connection: no reset
            assert r.status_code == 200
        assert json.loads(c.get("/v1/models").text)["data"]
    with pytest.raises(httpx.HTTPError):  # the server is gone: the check above was against a live socket
        httpx.get(server.url + "/healthz", timeout=1)


def _raw_exchange(port: int, data: bytes, wait: float = 3.0) -> tuple[bytes, bool]:
    """-> (what came back, whether the server closed the connection)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            return out, False
        return out, True


@pytest.mark.slow
def test_ambiguous_framing_and_unread_bodies_close_the_connection(models_dir):
    body = b'{"prompt": "a 7", "steps": 1}'
    head = b"POST /v1/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    with LiveServer(make_settings(models_dir)) as server:
        smuggle = head + b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            len(body), len(body), body)  # fmt: skip
        out, closed = _raw_exchange(server.port, smuggle)
        assert out.startswith(b"HTTP/1.1 400") and closed  # by our check (h11) or by the parser (httptools)
        out, closed = _raw_exchange(server.port, head + b"content-length: 10000000000\r\nexpect: 100-continue\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413") and closed


async def test_an_abandoned_job_leaves_the_queue_and_its_budget_at_once(models_dir):
    async with serve_app(make_settings(models_dir)) as client:
        engine = client.engine
        job = Job("tiny-student", "tiny-student", "a 7", 1, None, [0], cost_s=0.5)
        engine.queue.append(job)
        engine.queued_work_s += job.cost_s
        engine.cancel(job)
        assert not engine.queue and engine.queued_work_s == 0 and job.cancelled


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/images/generations"])
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "Field required"),
        (b"[]", "request body must be a JSON object"),
        (b"null", "request body must be a JSON object"),
        (b'"a red 7"', "request body must be a JSON object"),
        (b"{}", "prompt: Field required"),
        (b'{"prompt": 5}', "prompt: Input should be a valid string"),
        (b'{"prompt": "a 7", "n": 0}', "n: Input should be greater than or equal to 1"),
        (b'{"prompt": "a 7", "nope": 1}', "nope: unknown field"),
    ],
)
async def test_bodies_that_are_not_a_valid_request_name_what_is_wrong(api, path, body, message):
    """The generation routes parse and validate their body themselves (server/body.py); the answers are those
    FastAPI gave for the same bodies."""
    r = await api.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == message


def test_the_generation_routes_are_called_directly_and_the_others_through_fastapi():
    from fewstep.server.api import router
    from fewstep.server.body import _direct_call
    from fewstep.server.protocol import GenerateRequest, ImagesRequest

    direct = {route.path: _direct_call(route) for route in router.routes}
    assert direct["/v1/generate"] == (GenerateRequest, "body", "request")
    assert direct["/v1/images/generations"] == (ImagesRequest, "body", "request")
    assert all(v is None for k, v in direct.items() if not k.startswith("/v1/generate") and "images" not in k)


async def test_a_json_body_under_another_media_type_is_not_parsed_as_fastapi_would_not(api):
    """FastAPI parses JSON only for application/json and application/*+json; text/json stays bytes: a 400."""
    body = json.dumps(OK)
    r = await api.post("/v1/generate", content=body, headers={"content-type": "text/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "request body must be a JSON object"
    r = await api.post("/v1/generate", content=body, headers={"content-type": "application/vnd.api+json"})
    assert r.status_code == 200


def test_only_a_plain_body_and_request_are_called_directly():
    from fastapi import Body, Request
    from fastapi.routing import APIRoute

    from fewstep.server.body import _direct_call
    from fewstep.server.protocol import GenerateRequest

    async def embedded(request: Request, body: GenerateRequest = Body(embed=True)):  # noqa: B008
        return None

    async def with_query(body: GenerateRequest, request: Request, verbose: bool):
        return None

    async def plain(request: Request, body: GenerateRequest):
        return None

    assert _direct_call(APIRoute("/e", embedded, methods=["POST"])) is None
    assert _direct_call(APIRoute("/q", with_query, methods=["POST"])) is None
    assert _direct_call(APIRoute("/p", plain, methods=["POST"])) == (GenerateRequest, "body", "request")


@pytest.mark.slow
def test_a_client_leaving_mid_body_under_plain_uvicorn_is_a_client_event(models_dir):
    """Without fewstep serve's deadlines (another ASGI server) the direct body read meets Starlette's
    ClientDisconnect: counted as a client disconnect, never an internal error."""
    import socket
    import time

    with LiveServer(make_settings(models_dir, warmup=False)) as server:
        metrics = server.app.state.metrics.registry

        def errors(kind: str) -> float:
            return metrics.get_sample_value("fewstep_errors_total", {"type": kind}) or 0.0

        before = errors("client_disconnected"), errors("internal")
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            head = b"POST /v1/generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            head += b"Content-Length: 200\r\n\r\n"
            s.sendall(head + b'{"prompt": "a')
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        while errors("client_disconnected") == before[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert errors("client_disconnected") == before[0] + 1 and errors("internal") == before[1]
