"""The HTTP API in-process through httpx's ASGITransport: endpoints, determinism, errors, auth, request ids."""

import asyncio
import base64
import io
import time

import pytest
from PIL import Image

from fewstep.server.api import create_app
from tests.serving import AppClient, make_settings, running, serve_app

pytestmark = pytest.mark.anyio


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


async def test_health_readiness_and_models(api):
    assert (await api.get("/healthz")).text == "ok"
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.text.startswith("degraded")
    assert "tiny-broken" in ready.text  # the student that could not load
    models = {m["id"]: m for m in (await api.get("/v1/models")).json()["data"]}
    assert models["tiny-student"]["supported_steps"] == [1, 2, 4]
    assert models["tiny-student"]["teacher"] == "tiny-teacher" and models["tiny-student"]["default"]
    assert models["tiny-teacher"]["role"] == "teacher" and models["tiny-teacher"]["native_size"] == "32x32"
    assert models["tiny-broken"]["ready"] is False and "transformer.safetensors" in models["tiny-broken"]["error"]


async def test_generate_returns_images_with_provenance_and_timings(api):
    r = await api.post("/v1/generate", json={"prompt": "a red 7 on black", "steps": 2, "n": 3, "seed": 40})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["served_by"] == "tiny-student" and body["steps"] == 2 and body["fallback_reason"] is None
    assert [im["seed"] for im in body["images"]] == [40, 41, 42]
    assert all(_png(im["b64"]).size == (32, 32) for im in body["images"])
    assert set(body["timings"]) == {"queue_ms", "inference_ms", "encode_ms", "total_ms"}
    assert r.headers["x-request-id"]


async def test_same_seed_same_bytes(api):
    req = {"prompt": "seven in red on a black background", "steps": 4, "seed": 7}
    a, b = [(await api.post("/v1/generate", json=req)).json() for _ in range(2)]
    other = (await api.post("/v1/generate", json={**req, "seed": 8})).json()
    assert a["images"][0]["b64"] == b["images"][0]["b64"]
    assert a["images"][0]["b64"] != other["images"][0]["b64"]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_raw_image_with_accept_header(api, fmt):
    r = await api.post(
        "/v1/generate",
        json={"prompt": "a white 0 on blue", "output_format": fmt, "seed": 1},
        headers={"accept": f"image/{fmt}"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == f"image/{fmt}"
    assert Image.open(io.BytesIO(r.content)).format.lower() == fmt
    assert r.headers["x-served-by"] == "tiny-student" and r.headers["x-seed"] == "1"


async def test_png_compress_level_changes_the_bytes_not_the_pixels(api, models_dir):
    """Served PNGs use the fast zlib level (png_compress_level, default 1): lossless, so the pixels are those of
    an uncompressed PNG (level 0) of the same request, in fewer bytes."""
    req = {"prompt": "a green 3 on white", "steps": 1, "seed": 5, "n": 2}
    fast = (await api.post("/v1/generate", json=req)).json()["images"]
    async with serve_app(make_settings(models_dir, png_compress_level=0, warmup=False)) as c:
        stored = (await c.post("/v1/generate", json=req)).json()["images"]
    for a, b in zip(fast, stored, strict=True):
        assert list(_png(a["b64"]).getdata()) == list(_png(b["b64"]).getdata())
        assert len(base64.b64decode(a["b64"])) < len(base64.b64decode(b["b64"]))


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ('{"prompt": "a red 7', 400, None),  # malformed JSON
        ('["a red 7"]', 400, None),
        ({"prompt": 7}, 400, "prompt"),
        ({"prompt": "a red 7 on black", "steps": "two"}, 400, "steps"),
        ({"prompt": "a red 7 on black", "steps": 0}, 400, "steps"),
        ({"prompt": "a red 7 on black", "steps": 10_000}, 400, "steps"),
        ({"prompt": "a red 7 on black", "n": 0}, 400, "n"),
        ({"prompt": "a red 7 on black", "n": 9}, 400, "n"),
        ({"prompt": "   "}, 400, "prompt"),
        ({"prompt": "x" * 301}, 400, "prompt"),
        ({"prompt": "a red 7 on black", "model": "nope"}, 404, "model"),
        ({"prompt": "a red 7 on black", "model": "../../etc/passwd"}, 400, "model"),
        ({"prompt": "a red 7 on black", "seed": 2**64}, 400, "seed"),
        ({"prompt": "a red 7 on black", "seed": -1}, 400, "seed"),
        ({"prompt": "a red 7 on black", "output_format": "gif"}, 400, "output_format"),
        ({"prompt": "a red 7 on black", "colour": "red"}, 400, "colour"),
        ({"prompt": "a red 7 on black", "guidance": "strong"}, 400, "guidance"),
    ],
)
async def test_bad_input_is_a_4xx_naming_the_field(api, payload, status, param):
    if isinstance(payload, str):
        r = await api.post("/v1/generate", content=payload, headers={"content-type": "application/json"})
    else:
        r = await api.post("/v1/generate", json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


async def test_oversized_body_and_wrong_content_type(api):
    r = await api.post(
        "/v1/generate", content=b'{"prompt": "' + b"a" * 70_000 + b'"}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = await api.post("/v1/generate", content=b"prompt=a", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert (await api.get("/v1/nothing")).status_code == 404
    assert (await api.get("/v1/generate")).status_code == 405


async def test_request_id_is_honoured(api):
    r = await api.get("/v1/models", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await api.get("/v1/models", headers={"x-request-id": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces" and len(r.headers["x-request-id"]) == 32


async def test_metrics_show_latencies(api):
    await api.post("/v1/generate", json={"prompt": "a red 7 on black", "seed": 3})
    text = (await api.get("/metrics")).text
    for name in (
        "fewstep_request_latency_seconds_bucket",
        "fewstep_queue_wait_seconds_count",
        "fewstep_batch_inference_seconds_count",
        "fewstep_batch_size_images_count",
        "fewstep_queue_depth_requests",
        "fewstep_requests_in_flight",
        "fewstep_images_generated_total",
        "fewstep_errors_total",
    ):
        assert name in text, name
    assert 'endpoint="generate",model="tiny-student",status="200",steps="1"' in text


async def test_api_keys_protect_v1(models_dir):
    async with serve_app(make_settings(models_dir, api_keys=["s3cret"], warmup=False)) as c:
        r = await c.post("/v1/generate", json={"prompt": "a red 7 on black"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert (
            await c.post("/v1/generate", json={"prompt": "a red 7 on black"}, headers={"authorization": "Bearer wrong"})
        ).status_code == 401
        assert (
            await c.post(
                "/v1/generate", json={"prompt": "a red 7 on black"}, headers={"authorization": "Bearer s3cret"}
            )
        ).status_code == 200
        assert (await c.get("/healthz")).status_code == 200  # probes stay open


async def test_readyz_is_503_until_warm_up_ends(models_dir):
    app = create_app(make_settings(models_dir))
    engine = app.state.engine
    assert engine.readiness() == ("unavailable", ["warming up"])  # before start: /readyz answers 503
    async with AppClient(app) as c:
        r = await c.get("/readyz")
        assert r.status_code == 503 and "warming up" in r.text
        async with running(app, warm=False):  # the warm-up runs in the background
            deadline = time.monotonic() + 60
            while (r := await c.get("/readyz")).status_code != 200:
                assert r.status_code == 503 and "warming up" in r.text
                assert time.monotonic() < deadline, "never warmed up"
                await asyncio.sleep(0.01)
            assert r.status_code == 200 and engine.warmed_up


@pytest.mark.anyio
async def test_guidance_for_a_student_with_cfg_distilled_in_is_refused(api):
    r = await api.post("/v1/generate", json={"prompt": "a red 7 on black", "model": "tiny-student", "guidance": 3.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance"
    r = await api.post("/v1/generate", json={"prompt": "a red 7 on black", "model": "tiny-student", "guidance": 1.0})
    assert r.status_code == 200 and r.json()["served_by"] == "tiny-student"
    body = {"prompt": "a red 7 on black", "model": "tiny-student", "guidance": 3.0, "quality": "teacher"}
    r = await api.post("/v1/generate", json=body)
    assert r.status_code == 200 and r.json()["served_by"] == "tiny-teacher"
    listing = {m["id"]: m for m in (await api.get("/v1/models")).json()["data"]}
    assert listing["tiny-student"]["guidance"] == {"default": 1.0, "input": False}
    assert listing["tiny-teacher"]["guidance"]["input"] is True


def test_every_app_gets_its_own_copy_of_the_routes(models_dir):
    """The routes are given to FastAPI directly (an included router's are matched twice per request); FastAPI then
    adds /openapi.json and /docs to the app's list, which must not be the module's: a second app would get them
    twice."""
    from fewstep.server import api

    before = [r.path for r in api.router.routes]
    apps = [api.create_app(make_settings(models_dir, warmup=False)) for _ in range(2)]
    assert [r.path for r in api.router.routes] == before
    paths = [[r.path for r in app.routes] for app in apps]
    assert paths[0] == paths[1] and len(set(paths[0])) == len(paths[0]) and "/openapi.json" in paths[0]
