"""Fixtures for the server tests: the tiny served models (built once per run, no distillation), the app
in-process through httpx's ASGITransport, and a real uvicorn server for the end-to-end tests.
The helpers behind them live in tests/serving.py."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fewstep.models.checkpoint import read_card, update_card
from fewstep.models.critic import CRITIC
from fewstep.models.pipeline import TextToImage
from fewstep.training.gate import Critic, save_critic
from tests.serving import AppClient, LiveServer, build_models_dir, make_settings, serve_app


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_teacher) -> Path:
    return build_models_dir(tmp_path_factory.mktemp("served"), tiny_teacher)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def api(models_dir, anyio_backend) -> AsyncIterator[AppClient]:
    """A warm app with the default settings, shared by a module's tests, and a client for it."""
    async with serve_app(make_settings(models_dir)) as client:
        yield client


@pytest.fixture(scope="module")
def live(models_dir) -> Iterator[LiveServer]:
    with LiveServer(make_settings(models_dir)) as server:
        yield server


@pytest.fixture(scope="session")
def gated_dir(models_dir, tmp_path_factory):
    """tiny-teacher + tiny-student with a gate whose thresholds regenerate every 1-step image and no 2-step one."""
    root = tmp_path_factory.mktemp("gated")
    for name in ("tiny-teacher", "tiny-student"):
        shutil.copytree(models_dir / name, root / name)
    student = TextToImage.load(root / "tiny-student", kernels="torch")
    critic = Critic(text_dim=student.config.text.dim)
    save_critic(root / "tiny-student-gate", critic, student, {"method": "test: untrained"})
    sha = read_card(root / "tiny-student-gate").files[CRITIC].sha256
    # scores are probabilities in [0, 1]: under 2.0 always, under -1.0 never
    update_card(root / "tiny-student", gate={"name": "tiny-student-gate", "sha256": sha, "rate": 0.05,
                "thresholds": {"1": 2.0, "2": -1.0}, "n": 10, "command": "test"})  # fmt: skip
    return root
