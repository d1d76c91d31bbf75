"""The HTTP layer: thin FastAPI routes over the Engine (vllm's entrypoints style).

Every error, on every route, is JSON in OpenAI's shape {"error": {"message", "type", "param", "code"}};
bad input is a 4xx naming the field, never a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import re
import time
import uuid
from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from fewstep.models.images import encode
from fewstep.server.engine import BadRequest, Engine, Job, NotServable, QueueFull, Result, device_executor
from fewstep.server.metrics import Metrics
from fewstep.server.protocol import QUALITY_STEPS, GenerateRequest, GenerateResponse, ImagesRequest
from fewstep.server.registry import Registry
from fewstep.server.settings import ServeSettings

PLAYGROUND = files("fewstep.server").joinpath("static/playground.html").read_text(encoding="utf-8")
log = logging.getLogger("fewstep.server")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await error_response(413, f"request body is larger than {self.limit} bytes", code="body_too_large")(
                scope, receive, send
            )
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"request body is larger than {self.limit} bytes", code="body_too_large")
            return message

        return await self.app(scope, limited, send)


def create_app(settings: ServeSettings, registry: Registry | None = None) -> FastAPI:
    """The app; ``registry`` defaults to scanning settings.models (tests may pass one they built)."""
    from fewstep.kernels.runtime import resolve_device

    metrics = Metrics.create()
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    executor = device_executor()  # models load on the thread that will run them (see device_executor)
    if registry is None:
        from fewstep.kernels.runtime import resolve

        device = resolve_device(settings.device)
        resolve(settings.kernels, device)  # a forced "triton" that cannot run here fails now, naming why
        registry = executor.submit(
            Registry.scan, settings.models, device, settings.default_model, settings.kernels
        ).result()
    engine = Engine(registry, settings, metrics, executor)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        kernels = sorted({e.model.kernels for e in registry.models.values() if e.model is not None})
        log.info(
            "serving %s (default %s; kernels %s)",
            sorted(registry.models),
            registry.default,
            "/".join(kernels) or "none",
        )
        yield
        await engine.stop()

    app = FastAPI(title="fewstep", version=_version(), lifespan=lifespan)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics

    # ---- errors: one JSON shape everywhere ------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.errors.labels(type=exc.code or exc.type).inc()
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _validation_error(exc.errors(), metrics)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: say so, without a stack trace
        log.exception("unhandled error")
        metrics.errors.labels(type="internal").inc()
        return error_response(500, "internal error", "server_error", code="internal_error")

    # request id, auth and in-flight accounting live in RequestContext (pure ASGI: a BaseHTTPMiddleware
    # would hide client disconnects from the handlers)

    # ---- routes ----------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        """The browser playground: plain HTML + JS calling POST /v1/generate (server/static/playground.html)."""
        return HTMLResponse(PLAYGROUND)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz():
        return "ok"

    @app.get("/readyz")
    async def readyz():
        state, causes = engine.readiness()
        if state == "unavailable":
            return PlainTextResponse("unavailable: " + "; ".join(causes), status_code=503)
        return PlainTextResponse(state if not causes else f"{state}: " + "; ".join(causes))

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        data = []
        for m in registry.models.values():
            data.append(
                {
                    "id": m.name,
                    "object": "model",
                    "owned_by": "fewstep",
                    "role": m.role,
                    "supported_steps": m.supported_steps() if m.role == "student" else None,
                    "default_steps": m.card.sampling.default_steps if m.card and m.card.sampling else None,
                    "max_steps": settings.max_teacher_steps if m.role == "teacher" else None,
                    "teacher": m.teacher,
                    "native_size": _size(m),
                    "ready": m.ready,
                    "error": m.error,
                    "default": m.name == registry.default,
                }
            )
        return {"object": "list", "data": data}

    @app.post("/v1/generate")
    async def generate(request: Request):
        body = await _parse(request, GenerateRequest)
        result, encoded, t = await _run(
            request,
            body.model,
            body.prompt,
            body.steps,
            body.n,
            body.seed,
            body.guidance,
            body.quality == "teacher",
            body.output_format,
            "generate",
        )
        timings = {
            "queue_ms": result.queue_ms,
            "inference_ms": result.inference_ms,
            "encode_ms": t["encode_ms"],
            "total_ms": 1000 * (time.perf_counter() - t["start"]),
        }
        if body.n == 1 and "image/" + body.output_format in request.headers.get("accept", ""):
            return Response(
                encoded[0],
                media_type="image/" + body.output_format,
                headers={
                    "x-served-by": result.served_by,
                    "x-fallback-reason": result.fallback_reason or "",
                    "x-seed": str(result.seeds[0]),
                    "x-steps": str(result.steps),
                    "x-timings": json.dumps({k: round(v, 2) for k, v in timings.items()}),
                },
            )
        return GenerateResponse(
            images=[
                {"b64": base64.b64encode(b).decode(), "seed": s, "format": body.output_format}
                for b, s in zip(encoded, result.seeds, strict=True)
            ],
            model=body.model or registry.default,
            served_by=result.served_by,
            steps=result.steps,
            fallback_reason=result.fallback_reason,
            batch_images=result.batch_images,
            timings=timings,
        )

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        body = await _parse(request, ImagesRequest)
        if body.response_format == "url":
            raise APIError(
                400,
                "response_format 'url' is not supported: images are not stored; use b64_json",
                param="response_format",
                code="unsupported_value",
            )
        name = body.model or registry.default
        entry = registry.models.get(name)
        native = _size(entry) if entry else None
        if body.size not in (None, "auto", native):
            raise APIError(
                400,
                f"size {body.size!r} is not supported: {name} generates {native} images",
                param="size",
                code="unsupported_value",
            )
        quality = body.quality or "auto"
        fmt = body.output_format or "png"
        result, encoded, _ = await _run(
            request,
            body.model,
            body.prompt,
            QUALITY_STEPS[quality],
            body.n,
            body.seed,
            None,
            quality == "teacher",
            fmt,
            "images",
            body.output_compression,
        )
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(b).decode(), "revised_prompt": None} for b in encoded],
                "output_format": fmt,
                "size": native,
                "quality": quality,
            },
            headers={
                "x-served-by": result.served_by,
                "x-fallback-reason": result.fallback_reason or "",
                "x-steps": str(result.steps),
            },
        )

    async def _run(
        request: Request, model, prompt, steps, n, seed, guidance, want_teacher, fmt, endpoint, compression=None
    ) -> tuple[Result, list[bytes], dict]:
        start = time.perf_counter()
        status, served, served_steps = "error", model or registry.default, steps
        try:
            _check_prompt(prompt, settings)
            if n > settings.max_n:
                raise APIError(400, f"n must be at most {settings.max_n}", param="n", code="invalid_value")
            try:
                entry, served_steps, reason = engine.route(model, steps, want_teacher)
            except BadRequest as e:
                raise APIError(e.status, str(e), param=e.param, code=e.code) from None
            except NotServable as e:
                raise APIError(
                    503,
                    str(e),
                    "server_error",
                    code="model_unavailable",
                    headers={"Retry-After": str(settings.retry_after_s)},
                ) from None
            served = entry.name
            base = random.randrange(0, 2**31) if seed is None else seed
            if base + n - 1 > 2**53 - 1:
                raise APIError(400, "seed + n - 1 must be at most 2**53 - 1", param="seed", code="invalid_value")
            job = Job(
                model=entry.name,
                requested=model or registry.default,
                prompt=prompt,
                steps=served_steps,
                guidance=guidance,
                seeds=[base + i for i in range(n)],
                fallback_reason=reason,
            )
            result = await _await_job(request, job)
            t0 = time.perf_counter()
            quality = 95 if compression is None else compression
            encoded = await asyncio.to_thread(lambda: [encode(im, fmt, quality) for im in result.images])
            status = "200"
            return result, encoded, {"encode_ms": 1000 * (time.perf_counter() - t0), "start": start}
        except APIError as e:
            status = str(e.status)
            raise
        finally:
            metrics.request_latency.labels(
                endpoint=endpoint, model=served, steps=str(served_steps), status=status
            ).observe(time.perf_counter() - start)

    async def _await_job(request: Request, job: Job) -> Result:
        """Wait for the job; give up on a timeout (504) or when the client goes away (dropped unrun)."""
        task = asyncio.ensure_future(engine.submit(job))
        deadline = time.perf_counter() + settings.request_timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.05)
                if done:
                    return task.result()
                if await request.is_disconnected():  # counted by the APIError handler
                    job.cancelled = True
                    raise APIError(499, "client disconnected", code="client_disconnected")
                if time.perf_counter() > deadline:
                    job.cancelled = True
                    raise APIError(
                        504,
                        f"request did not finish within {settings.request_timeout_s} s",
                        "server_error",
                        code="timeout",
                    )
        except asyncio.CancelledError:  # the server cancelled the handler: the client has gone
            job.cancelled = True
            metrics.errors.labels(type="client_disconnected").inc()
            raise
        except QueueFull:
            raise APIError(
                429,
                "the queue is full; retry later",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(settings.retry_after_s)},
            ) from None
        except NotServable as e:
            raise APIError(
                503,
                str(e),
                "server_error",
                code="model_unavailable",
                headers={"Retry-After": str(settings.retry_after_s)},
            ) from None
        finally:
            if not task.done():
                task.cancel()

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestContext, settings=settings, metrics=metrics)
    return app


class RequestContext:
    """X-Request-ID (honoured when well-formed, else generated; always returned), Bearer auth on /v1,
    the in-flight gauge and one structured log line per request."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = {"code": 0}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        path = scope.get("path", "")
        if self.settings.api_keys and path.startswith("/v1/"):
            auth = headers.get("authorization", "")
            if not (auth.startswith("Bearer ") and auth[7:] in self.settings.api_keys):
                self.metrics.errors.labels(type="unauthorized").inc()
                resp = error_response(
                    401,
                    "missing or invalid API key (Authorization: Bearer KEY)",
                    "authentication_error",
                    code="invalid_api_key",
                )
                return await resp(scope, receive, send_with_id)
        self.metrics.in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            log.info(
                "request_id=%s method=%s path=%s status=%s ms=%.1f",
                rid,
                scope.get("method"),
                path,
                status["code"],
                1000 * (time.perf_counter() - start),
            )


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    ctype = request.headers.get("content-type", "")
    if ctype and "json" not in ctype:
        raise APIError(415, f"content-type must be application/json, not {ctype!r}", code="unsupported_media_type")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_api_error(e.errors()) from None


def _validation_api_error(errors) -> APIError:
    first = errors[0]
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    return APIError(400, f"{field}: {msg}" if field else msg, param=field, code="invalid_value")


def _validation_error(errors, metrics: Metrics) -> JSONResponse:
    e = _validation_api_error(errors)
    metrics.errors.labels(type="invalid_value").inc()
    return error_response(e.status, e.message, e.type, e.param, e.code)


def _check_prompt(prompt: str, settings: ServeSettings) -> None:
    if not prompt.strip():
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if len(prompt) > settings.max_prompt_chars:
        raise APIError(
            400, f"prompt must be at most {settings.max_prompt_chars} characters", param="prompt", code="invalid_value"
        )


def _size(entry) -> str | None:
    if entry is None or entry.card is None:
        return None
    size = entry.card.model.get("image_size", 32)
    return f"{size}x{size}"


def _version() -> str:
    from fewstep import __version__

    return __version__
