"""The HTTP layer: thin FastAPI routes over the serving object (vLLM's entrypoints style).

Routes take pydantic request models (server/protocol.py), so /openapi.json describes every body; the work is
in ``ImageService`` (server/serving.py); errors (server/errors.py), body parsing (server/body.py) and middleware
(server/middleware.py) live in their own modules.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib.resources import files

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fewstep.models.pipeline import TextToImage
from fewstep.server import errors
from fewstep.server.body import JSONRoute
from fewstep.server.engine import Engine, device_executor
from fewstep.server.metrics import Metrics
from fewstep.server.middleware import Admission, BodyLimit, RequestContext
from fewstep.server.protocol import GenerateRequest, GenerateResponse, ImagesRequest
from fewstep.server.registry import Registry
from fewstep.server.serving import ImageService
from fewstep.server.settings import ServeSettings
from fewstep.server.streams import Streams

PLAYGROUND = files("fewstep.server").joinpath("static/playground.html").read_text(encoding="utf-8")
log = logging.getLogger("fewstep.server")
router = APIRouter(route_class=JSONRoute)


def _service(request: Request) -> ImageService:
    return request.app.state.service


# the generation routes first: a request is matched against the routes in order
@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
)
async def generate(body: GenerateRequest, request: Request):
    """Images for a prompt; with `Accept: image/png` (n = 1) the image itself, else JSON with base64 images."""
    return await _service(request).generate(body, request)


@router.post("/v1/images/generations")
async def images_generations(body: ImagesRequest, request: Request):
    """OpenAI's images API."""
    return await _service(request).images(body, request)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground():
    """The browser playground: plain HTML + JS calling POST /v1/generate (server/static/playground.html)."""
    return HTMLResponse(PLAYGROUND)


@router.get("/healthz", response_class=PlainTextResponse)
async def healthz():
    return "ok"


@router.get("/readyz", response_class=PlainTextResponse)
async def readyz(request: Request):
    state, causes = request.app.state.engine.readiness()
    text = state if not causes else f"{state}: " + "; ".join(causes)
    return PlainTextResponse(text, status_code=503 if state == "unavailable" else 200)


@router.get("/metrics")
async def prometheus(request: Request):
    metrics: Metrics = request.app.state.metrics
    metrics.queued_work.set(request.app.state.engine.queued_work_s)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(request: Request):
    return _service(request).models()


def create_app(settings: ServeSettings, registry: Registry | None = None) -> FastAPI:
    """The app; ``registry`` defaults to scanning settings.models (tests may pass one they built)."""
    from fewstep.kernels.runtime import resolve, resolve_device

    if settings.threads:
        torch.set_num_threads(settings.threads)
    executor = device_executor()  # models load on the thread that will run them (see device_executor)
    device = resolve_device(settings.device)
    if registry is None:
        resolve(settings.kernels, device)  # a forced "triton" that cannot run here fails now, naming why
        scan = executor.submit(Registry.scan, settings.models, device, settings.default_model, settings.kernels)
        registry = scan.result()
    if settings.cpu_graphs and device.type == "cpu":
        for entry in registry.models.values():
            if isinstance(entry.model, TextToImage):
                entry.model.use_graphs()  # traced on the device thread at its first batch (the warm-up)
    steps = {s for m in registry.models.values() for s in m.supported_steps()}
    steps |= {m.card.sampling.default_steps for m in registry.models.values() if m.card and m.card.sampling}
    metrics = Metrics.create().bound(registry.models, steps)
    streams = Streams.resolve(settings.cpu_streams, device, settings.threads or torch.get_num_threads())
    engine = Engine(registry, settings, metrics, executor, streams)

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
        await engine.stop(settings.drain_timeout_s)

    app = FastAPI(title="fewstep", version=_version(), lifespan=lifespan, routes=list(router.routes))
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.state.service = ImageService(engine, registry, settings, metrics)
    errors.install(app, metrics)
    # the routes directly, not app.include_router: FastAPI matches an included router's routes twice per request
    # added innermost first: a request meets RequestContext, then BodyLimit, then Admission
    app.add_middleware(Admission, engine=engine, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestContext, settings=settings, metrics=metrics)
    return app


def _version() -> str:
    from fewstep import __version__

    return __version__
