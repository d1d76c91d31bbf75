"""Serving test helpers (imported, never through conftest): the fixture models directory, settings, the app
in-process through httpx's ASGITransport, and a real uvicorn server on a loopback port for the end-to-end tests.

The fixture models are made from the tiny teacher without any distillation: the student is the teacher's
weights saved as a student card that serves 1, 2 and 4 steps. The server tests exercise routing, batching and
fallback, not image quality, so an undistilled student serves them as well as a distilled one.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import torch
import uvicorn
from fastapi import FastAPI

from fewstep.models.flow import timesteps
from fewstep.models.pipeline import TextToImage
from fewstep.server.api import create_app
from fewstep.server.settings import ServeSettings

STUDENT_STEPS = (1, 2, 4)


def build_models_dir(root: Path, teacher_dir: Path) -> Path:
    """Under ``root``: tiny-teacher (a copy of ``teacher_dir``), tiny-student (the teacher's weights as a
    1/2/4-step student), tiny-nan (a student whose output is NaN: it runs, and returns non-finite images) and
    tiny-broken (a student whose transformer weights are truncated: it cannot load)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(teacher_dir, root / "tiny-teacher")
    teacher = TextToImage.load(root / "tiny-teacher", kernels="torch")
    sampling = {
        "default_steps": 1,
        "sampler": "euler",
        "any_steps": False,
        "max_steps": max(STUDENT_STEPS),
        "timesteps": {str(k): timesteps(k) for k in STUDENT_STEPS},
        "guidance": 1.0,
    }
    card = {
        "name": "tiny-student",
        "role": "student",
        "parameterization": "velocity",
        "sampling": sampling,
        "teacher": {"name": "tiny-teacher", "sha256": teacher.weights_sha256()},
    }
    teacher.save(root / "tiny-student", card, dtype="float32")

    nan = TextToImage.load(root / "tiny-student", kernels="torch")
    with torch.no_grad():
        nan.transformer.final_layer.linear.bias.fill_(float("nan"))
    nan_card = nan.card.model_dump(exclude={"files", "model"})
    nan.save(root / "tiny-nan", {**nan_card, "name": "tiny-nan"}, dtype="float32")

    shutil.copytree(root / "tiny-student", root / "tiny-broken")
    card_path = root / "tiny-broken" / "card.json"
    card_json = json.loads(card_path.read_text())
    card_json["name"] = "tiny-broken"
    card_path.write_text(json.dumps(card_json))
    weights = root / "tiny-broken" / "transformer.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return root


def make_settings(models_dir: Path, **changes) -> ServeSettings:
    base = dict(models=models_dir, device="cpu", default_model="tiny-student", max_wait_ms=2.0, log_level="warning")
    base.update(changes)
    return ServeSettings(**base)


# ---- in-process: the app through httpx's ASGITransport ---------------------------------------------------


class AppClient(httpx.AsyncClient):
    """An httpx.AsyncClient wired to the app in this event loop; ``app`` and ``engine`` for inspection."""

    def __init__(self, app: FastAPI, **kw):
        kw.setdefault("timeout", 60)
        super().__init__(transport=httpx.ASGITransport(app=app), base_url="http://fewstep.test", **kw)
        self.app = app

    @property
    def engine(self):
        return self.app.state.engine


@asynccontextmanager
async def running(app: FastAPI, warm: bool = True) -> AsyncIterator[FastAPI]:
    """Run the app's lifespan (ASGITransport does not): the engine starts, and with ``warm`` the block begins
    once its warm-up has finished, as the tests start from a warm server."""
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + 60
        while warm and not app.state.engine.warmed_up:
            if time.monotonic() > deadline:
                raise RuntimeError("the engine did not warm up within 60 s")
            await asyncio.sleep(0.01)
        yield app


@asynccontextmanager
async def serve_app(settings: ServeSettings, **client_kw) -> AsyncIterator[AppClient]:
    """A warm app for ``settings`` and a client for it: ``async with serve_app(make_settings(d)) as c: ...``"""
    app = create_app(settings)
    async with running(app), AppClient(app, **client_kw) as client:
        yield client


# ---- end to end: a real uvicorn server on a loopback port ------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread: plain uvicorn, as another deployment
    would run the app, or with ``lifecycle`` the server of ``fewstep serve`` (server/lifecycle.py)."""

    def __init__(self, settings: ServeSettings, lifecycle: bool = False):
        self.port = free_port()
        settings = settings.model_copy(update={"port": self.port, "host": "127.0.0.1"})
        self.app = create_app(settings)
        self.url = f"http://127.0.0.1:{self.port}"
        if lifecycle:
            from fewstep.server.lifecycle import build_server

            self.server = build_server(self.app, settings)
        else:
            config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
            self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 60
        while not (self.server.started and self.engine.warmed_up):  # tests start from a warm server
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)
