"""benchmarks/loadgen.py's open-loop generator against a tiny asyncio server of known behaviour: every answer and
failure is counted once, the in-flight cap holds, and a request without an answer is given up after its patience."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from loadgen import OpenLoop  # noqa: E402  (benchmarks/ is not a package)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _server(answer: bytes | None) -> tuple[asyncio.AbstractServer, list[int]]:
    """Answers every request with ``answer`` (or never, for None); counts the requests per connection."""
    per_connection: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        per_connection.append(0)
        me = len(per_connection) - 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(len(b'{"prompt": "a red 7 on black", "steps": 1}'))
                per_connection[me] += 1
                if answer is not None:
                    writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, per_connection


async def _run(answer: bytes | None, rate: float, seconds: float, cap: int, patience: float):
    server, per_connection = await _server(answer)
    gen = OpenLoop(server.sockets[0].getsockname()[1], {"prompt": "a red 7 on black", "steps": 1})
    answers, failures = [], []
    gen.on_answer = lambda status, headers, s: answers.append((status, headers.get("retry-after")))
    gen.on_failure = failures.append
    async with server:
        offered, not_sent, elapsed = await gen.run(rate, seconds, cap, patience)
    return offered, not_sent, elapsed, answers, failures, per_connection


async def test_every_answer_is_counted_once_over_reused_connections():
    ok = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 2\r\n\r\n{}"
    offered, not_sent, _, answers, failures, per_connection = await _run(ok, 400, 0.25, 64, 5)
    assert offered == 100 and not_sent == 0 and failures == []
    assert answers == [(429, "1")] * 100
    assert sum(per_connection) == 100 and len(per_connection) < 100  # keep-alive: connections are reused


async def test_unanswered_requests_time_out_and_the_cap_holds():
    offered, not_sent, elapsed, answers, failures, per_connection = await _run(None, 200, 0.1, 5, 0.2)
    assert offered == 20 and answers == []
    assert len(per_connection) == 5 and not_sent == 15  # at most 5 in flight: the rest were not sent
    assert failures == ["TimeoutError"] * 5  # each given up once, after its patience
    assert elapsed < 2


async def test_a_refused_connection_is_counted_as_a_failure():
    from tests.serving import free_port

    gen = OpenLoop(free_port(), {"prompt": "a red 7 on black", "steps": 1})  # nobody listens there
    answers, failures = [], []
    gen.on_answer = lambda *a: answers.append(a)
    gen.on_failure = failures.append
    offered, not_sent, _ = await gen.run(100, 0.05, 64, 2)
    assert offered == 5 and not_sent == 0 and answers == []
    assert failures == ["ConnectionRefusedError"] * 5
