"""Real uvicorn servers over tiny models: a teacher, a consistency student, a student whose weights are NaN
(it runs, and returns non-finite images) and a student whose weights file is truncated (it cannot load)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from fewstep.models.pipeline import TextToImage
from fewstep.server.api import create_app
from fewstep.server.settings import ServeSettings
from fewstep.training.distill.config import DistillConfig
from fewstep.training.distill.methods import distill


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_teacher) -> Path:
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(tiny_teacher, root / "tiny-teacher")
    cfg = DistillConfig(method="consistency", teacher=str(tiny_teacher), data="synthetic", batch_size=4, max_steps=1,
                        warmup_steps=1, out=str(root / ".runs"), name="tiny-student", export_dtype="float32",
                        grid_steps=4, log_every=1, student_step_set=(1, 2, 4))
    [student_dir] = distill(cfg)
    shutil.copytree(student_dir, root / "tiny-student")
    shutil.rmtree(root / ".runs")
    nan = TextToImage.load(root / "tiny-student")
    with torch.no_grad():
        nan.transformer.final_layer.linear.bias.fill_(float("nan"))
    card = nan.card.model_dump(exclude={"files", "model"})
    nan.save(root / "tiny-nan", {**card, "name": "tiny-nan"}, dtype="float32")
    shutil.copytree(root / "tiny-student", root / "tiny-broken")
    card_path = root / "tiny-broken" / "card.json"
    card_json = json.loads(card_path.read_text())
    card_json["name"] = "tiny-broken"
    card_path.write_text(json.dumps(card_json))
    weights = root / "tiny-broken" / "transformer.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, settings: ServeSettings):
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
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


def make_settings(models_dir: Path, **changes) -> ServeSettings:
    base = dict(models=models_dir, device="cpu", default_model="tiny-student", max_wait_ms=2.0, log_level="warning")
    base.update(changes)
    return ServeSettings(**base)


@pytest.fixture(scope="module")
def live(models_dir):
    with LiveServer(make_settings(models_dir)) as server:
        yield server
