"""Fixtures for the server tests: the tiny served models (built once per run, no distillation), the app
in-process through httpx's ASGITransport, and a real uvicorn server for the end-to-end tests.
The helpers behind them live in tests/serving.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

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
