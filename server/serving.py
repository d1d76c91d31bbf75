"""The serving object: turns a validated request into a response (vLLM's ``serving_*.py``), so the routes in
server/api.py stay one line each. Limits that depend on settings, routing, admission, waiting for the batch,
encoding and the request metric live here."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fewstep.server.engine import (
    BatchFailed,
    Encoding,
    Engine,
    Job,
    NotServable,
    Plan,
    QueueFull,
    Result,
    small,
)
from fewstep.server.errors import APIError, quote
from fewstep.server.metrics import Metrics
from fewstep.server.protocol import QUALITY_STEPS, GenerateRequest, GenerateResponse, ImagesRequest
from fewstep.server.registry import Registry
from fewstep.server.routing import RouteError
from fewstep.server.settings import ServeSettings


@dataclass
class Served:
    result: Result
    encoded: list[bytes]
    encode_ms: float
    start: float
    plan: Plan | None = None  # steps: "auto"
    slo_ms: float | None = None


class ImageService:
    def __init__(self, engine: Engine, registry: Registry, settings: ServeSettings, metrics: Metrics):
        self.engine, self.registry, self.settings, self.metrics = engine, registry, settings, metrics

    # ---- POST /v1/generate -------------------------------------------------------------------------------
    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        served = await self._serve(
            request,
            "generate",
            body.model,
            body.prompt,
            body.steps,
            body.n,
            body.seed,
            body.guidance,
            body.quality == "teacher",
            body.output_format,
            size=(body.width, body.height),
            slo_ms=body.latency_slo_ms,
            gate=body.quality_gate,
        )
        r = served.result
        timings = {
            "queue_ms": r.queue_ms,
            "inference_ms": r.inference_ms,
            "encode_ms": served.encode_ms,
            "total_ms": 1000 * (time.perf_counter() - served.start),
        }
        if body.n == 1 and "image/" + body.output_format in request.headers.get("accept", ""):
            return Response(served.encoded[0], media_type="image/" + body.output_format, headers={
                "x-served-by": r.served_by, "x-fallback-reason": r.fallback_reason or "", "x-seed": str(r.seeds[0]),
                "x-steps": str(r.steps), "x-timings": json.dumps({k: round(v, 2) for k, v in timings.items()}),
            })  # fmt: skip
        out = GenerateResponse(
            images=[{"b64": base64.b64encode(b).decode(), "seed": s, "format": body.output_format, **_gated(r, i)}
                    for i, (b, s) in enumerate(zip(served.encoded, r.seeds, strict=True))],
            model=body.model or self.registry.default, served_by=r.served_by, steps=r.steps,
            fallback_reason=r.fallback_reason, batch_images=r.batch_images, timings=timings,
            auto=None if served.plan is None else {
                "latency_slo_ms": served.slo_ms, "predicted_ms": 1000 * served.plan.predicted_s,
                "candidates": [{"model": d.model, "steps": d.steps, "predicted_ms": 1000 * p}
                               for d, p in served.plan.candidates]},
        )  # fmt: skip
        return Response(out.model_dump_json(), media_type="application/json")  # pydantic's serializer: no dict

    # ---- POST /v1/images/generations (OpenAI) ------------------------------------------------------------
    async def images(self, body: ImagesRequest, request: Request) -> Response:
        if body.response_format == "url":
            raise APIError(
                400,
                "response_format 'url' is not supported: images are not stored; use b64_json",
                param="response_format",
                code="unsupported_value",
            )
        name = body.model or self.registry.default
        if name not in self.registry.models:  # an unknown model is a 404 whatever else is wrong
            raise APIError(
                404,
                f"model {quote(name)} does not exist; GET /v1/models lists the models",
                param="model",
                code="model_not_found",
            )
        size = parse_size(body.size)
        quality = body.quality or "auto"
        fmt = body.output_format or "png"
        served = await self._serve(
            request,
            "images",
            body.model,
            body.prompt,
            QUALITY_STEPS[quality],
            body.n,
            body.seed,
            None,
            quality == "teacher",
            fmt,
            body.output_compression,
            size=size,
            size_param="size",
        )
        r = served.result
        w, h = r.images[0].size
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(b).decode(), "revised_prompt": None} for b in served.encoded],
            "output_format": fmt, "size": f"{w}x{h}", "quality": quality,
        }, headers={"x-served-by": r.served_by, "x-fallback-reason": r.fallback_reason or "",
                    "x-steps": str(r.steps)})  # fmt: skip

    # ---- shared ------------------------------------------------------------------------------------------
    async def _serve(
        self,
        request: Request,
        endpoint: str,
        model: str | None,
        prompt: str,
        steps: int | str | None,
        n: int,
        seed: int | None,
        guidance: float | None,
        want_teacher: bool,
        fmt: str,
        compression: int | None = None,
        size: tuple[int | None, int | None] = (None, None),
        size_param: str | None = None,  # the field a size error names ("size" on the OpenAI route)
        slo_ms: float | None = None,
        gate: bool | None = None,
    ) -> Served:
        start = time.perf_counter()
        status, served_by, served_steps = 500, model or self.registry.default, None if steps == "auto" else steps
        plan = None
        try:
            self._check(prompt, n)
            if steps != "auto" and slo_ms is not None:
                raise APIError(400, 'latency_slo_ms applies to steps "auto" only', param="latency_slo_ms",
                               code="invalid_value")  # fmt: skip
            if steps == "auto" and want_teacher:
                raise APIError(400, 'steps "auto" chooses the step count: leave out quality "teacher"',
                               param="steps", code="invalid_value")  # fmt: skip
            if steps == "auto":
                slo_ms = self.settings.default_latency_slo_ms if slo_ms is None else slo_ms
            try:
                if steps == "auto":
                    plan = self.engine.plan_auto(model, n, slo_ms / 1000, guidance)
                    decision = plan.decision
                else:
                    decision = self.engine.route(model, steps, want_teacher, guidance)
            except RouteError as e:
                headers = {"Retry-After": str(self.settings.retry_after_s)} if e.status == 503 else None
                type_ = "server_error" if e.status >= 500 else "invalid_request_error"
                raise APIError(e.status, str(e), type_, e.param, e.code, headers) from None
            served_by, served_steps = decision.model, decision.steps
            job_size = self._size(model or self.registry.default, decision.model, size, size_param)
            base = random.randrange(0, 2**31) if seed is None else seed
            if base + n - 1 > 2**53 - 1:
                raise APIError(400, "seed + n - 1 must be at most 2**53 - 1", param="seed", code="invalid_value")
            quality = 95 if compression is None else compression
            encoding = Encoding(fmt, quality, self.settings.png_compress_level)
            job = Job(
                gate=self._gate(decision.model, gate),
                model=decision.model,
                requested=model or self.registry.default,
                prompt=prompt,
                steps=decision.steps,
                guidance=guidance,
                seeds=[base + i for i in range(n)],
                size=job_size,
                fallback_reason=decision.reason,
                encoding=encoding,
            )
            result = await self._await(request, job)
            t0 = time.perf_counter()
            if result.encoded is not None:  # small images: encoded on the device thread (engine._encoded)
                encoded, encode_ms = result.encoded, result.encode_ms
            else:
                if small(result.images):
                    encoded = [encoding(im) for im in result.images]  # µs: a thread hop costs more
                else:  # large images encode off the event loop
                    encoded = await asyncio.to_thread(lambda: [encoding(im) for im in result.images])
                encode_ms = 1000 * (time.perf_counter() - t0)
            status = 200
            if plan is not None:
                self.engine.observe_auto(plan.predicted_s, time.perf_counter() - start)
                met = 1000 * (time.perf_counter() - start) <= slo_ms
                self.metrics.slo.labels(outcome="met" if met else "missed").inc()
                self.metrics.auto_steps.labels(
                    model=self.metrics.model_label(decision.model), steps=self.metrics.steps_label(decision.steps)
                ).inc()
            return Served(result, encoded, encode_ms, start, plan, slo_ms)
        except APIError as e:
            status = e.status_code
            raise
        except asyncio.CancelledError:  # cut by the drain deadline, which answers 503 (or the client left)
            status = 503
            raise
        finally:
            self.metrics.observe_request(endpoint, served_by, served_steps, status, time.perf_counter() - start)

    def _size(
        self, requested: str, serving: str, size: tuple[int | None, int | None], param: str | None
    ) -> tuple[int, int] | None:
        """The (width, height) to generate, checked against the model asked for and the one serving; None for the
        serving model's default (so requests that name it and requests that do not share a batch)."""
        width, height = size
        if width is None and height is None:
            return None
        chosen = None
        # the teacher too: a student that fails mid-batch hands the batch, at this size, to its teacher
        teacher = self.registry.teacher_for(serving)
        for name in dict.fromkeys((requested, serving, *([teacher.name] if teacher else []))):
            sizes = self.registry.models[name].sizes
            if sizes is None:
                continue
            chosen = (width or sizes.width, height or sizes.height)
            err = sizes.error(*chosen)
            if err is not None:
                raise APIError(400, f"{name}: {err[1]}", param=param or err[0], code="invalid_value")
        final = self.registry.models[serving].sizes
        return None if chosen is None or final is None or chosen == (final.width, final.height) else chosen

    def _gate(self, serving: str, asked: bool | None) -> bool:
        """Whether the job's images go through the serving student's quality gate."""
        entry = self.registry.models[serving]
        on = self.settings.quality_gate if asked is None else asked
        if not on or entry.role != "student":
            return False  # a teacher's images are not gated
        if entry.gate is None:
            if asked:
                why = entry.gate_error or "its card names none (fewstep train-gate, then fewstep calibrate-gate)"
                raise APIError(400, f"{entry.name} has no quality gate: {why}", param="quality_gate",
                               code="invalid_value")  # fmt: skip
            return False
        return True

    def _check(self, prompt: str, n: int) -> None:
        if not prompt.strip():
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        if len(prompt) > self.settings.max_prompt_chars:
            raise APIError(
                400,
                f"prompt must be at most {self.settings.max_prompt_chars} characters",
                param="prompt",
                code="invalid_value",
            )
        if n > self.settings.max_n:
            raise APIError(400, f"n must be at most {self.settings.max_n}", param="n", code="invalid_value")

    async def _await(self, request: Request, job: Job) -> Result:
        """Wait for the job; give up on a timeout (504) or when the client goes away (dropped unrun).

        Event-driven, not polled. Under ``fewstep serve`` the connection itself reports its loss (the DISCONNECT
        extension, server/lifecycle.py), so waiting is one future and one timer; under another ASGI server a task
        waits for the ``http.disconnect`` message beside the job (the body has been read, so nothing else arrives).
        That task was about a quarter of the request path's cost in-process (docs/performance.md)."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        try:
            result = self.engine.submit(job)
        except QueueFull:
            raise APIError(
                429,
                "the queue is full; retry later",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.engine.retry_after_s())},
            ) from None
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.settings.request_timeout_s, _end, result, _TimedOut())
        hooks = request.scope.get("extensions", {}).get(DISCONNECT)
        gone = None
        if hooks is not None:
            hooks.append(lambda: _end(result, _ClientGone()))
        else:
            gone = asyncio.ensure_future(_disconnected(request))
            gone.add_done_callback(lambda _: _end(result, _ClientGone()))
        try:
            return await result
        except _ClientGone:  # counted by the APIError handler
            raise APIError(499, "client disconnected", code="client_disconnected") from None
        except _TimedOut:
            raise APIError(
                504,
                f"request did not finish within {self.settings.request_timeout_s} s",
                "server_error",
                code="timeout",
            ) from None
        except asyncio.CancelledError:  # the server cancelled the handler (client gone, or the drain deadline)
            self.metrics.error("client_disconnected")
            raise
        except NotServable as e:
            raise APIError(503, str(e), "server_error", code="model_unavailable", headers=retry) from None
        except BatchFailed as e:
            raise APIError(500, str(e), "server_error", code="internal_error") from None
        finally:
            # every way out (result, timeout, disconnect, cancellation): out of the queue if still there; a running
            # batch drops it at its next step
            timer.cancel()
            if hooks is not None:
                hooks.clear()  # the callback holds the result: not kept until the connection's next request
            self.engine.cancel(job)
            if result.done() and not result.cancelled():
                result.exception()  # settled in the turn this handler was cancelled: read, so asyncio logs nothing
            if gone is not None and not gone.done():
                gone.cancel()

    # ---- GET /v1/models ----------------------------------------------------------------------------------
    def models(self) -> dict:
        data = []
        for m in self.registry.models.values():
            sizes = m.sizes
            data.append({
                "id": m.name, "object": "model", "owned_by": "fewstep", "role": m.role,
                "format": "diffusers" if m.spec is not None else "fewstep",
                "supported_steps": m.supported_steps() if m.role == "student" else None,
                "default_steps": m.default_steps,
                "max_steps": min(self.settings.max_teacher_steps, m.max_steps) if m.role == "teacher" else None,
                "teacher": m.teacher, "native_size": sizes.native if sizes else None,
                "guidance": {"default": m.default_guidance, "input": m.guidance_input},
                "sizes": sizes.describe() if sizes else None,
                "shared_components": getattr(m.model, "shared", {}),
                "ready": m.ready, "error": m.error, "default": m.name == self.registry.default,
                "quality_gate": None if m.gate is None else {
                    "rate": m.card.gate.rate, "thresholds": m.card.gate.thresholds, "critic": m.card.gate.name},
                "quality_gate_error": m.gate_error,
            })  # fmt: skip
        # bytes not loaded twice: components identical across pipelines (FLUX.1-schnell and -dev: CLIP, T5, VAE)
        return {"object": "list", "data": data, "shared_bytes": self.registry.shared_bytes}


# scope["extensions"] key of a server that reports a lost connection itself (``fewstep serve``: lifecycle.py): a list
# to which the request's handler appends callbacks, called when the client's connection is lost mid-request
DISCONNECT = "fewstep.disconnect"


class _ClientGone(Exception):
    """Set on a job's future when its client's connection is lost: the wait ends with a 499."""


class _TimedOut(Exception):
    """Set on a job's future at request_timeout_s: the wait ends with a 504."""


def _end(result: asyncio.Future, why: Exception) -> None:
    """Ends the wait for a job's result early (the job itself is cancelled by whoever waited)."""
    if not result.done():
        result.set_exception(why)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else arrives)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except asyncio.CancelledError:
        raise
    except BaseException:  # lifecycle.Deadlines unwinds receive with a BaseException when the client vanishes
        return


SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's "WIDTHxHEIGHT" (or "auto", or nothing: the model's default)."""
    if size in (None, "auto"):
        return None, None
    m = SIZE.match(size)
    if m is None:
        raise APIError(
            400, f"size {quote(size)} must be 'auto' or WIDTHxHEIGHT, like 1024x1024", param="size",
            code="invalid_value",
        )  # fmt: skip
    return int(m.group(1)), int(m.group(2))


def _gated(r: Result, i: int) -> dict:
    """Image i's quality-gate fields, when the gate judged it."""
    if r.gate_scores is None:
        return {}
    return {
        "gate_score": r.gate_scores[i],
        "served_by": r.image_served_by[i] if r.image_served_by else r.served_by,
        "fallback_reason": r.image_reasons[i] if r.image_reasons else None,
    }
