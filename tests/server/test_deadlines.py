"""Slow clients against a real server built as ``fewstep serve`` builds it (server/lifecycle.py), in a thread on
a loopback port, with half-second deadlines: partial headers are closed, a stalled upload is answered 408 and
does not hold up a shutdown, and a client that disconnects mid-upload is a client event, not an error."""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from fewstep.server.api import create_app
from fewstep.server.lifecycle import DrainingServer, build_server
from tests.serving import free_port, make_settings

pytestmark = pytest.mark.slow
DEADLINE = 0.5  # header_timeout_s and body_timeout_s
SLACK = 1.5  # a loaded 2-core machine: the deadline, give or take this
UPLOAD = b"POST /v1/generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"


class Served:
    """``build_server`` on a free loopback port, in a thread (which catches no signals: tests call
    ``server.handle_exit`` as the signal handler would)."""

    def __init__(self, models_dir, **changes):
        self.settings = make_settings(models_dir, port=free_port(), **changes)
        self.app = create_app(self.settings)
        self.server: DrainingServer = build_server(self.app, self.settings)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.settings.port}"

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.time() + 60
        while not (self.server.started and self.app.state.engine.warmed_up):
            assert self.thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.settings.port), timeout=10)
        return s

    def errors(self, type_: str) -> float:
        value = self.app.state.metrics.registry.get_sample_value("fewstep_errors_total", {"type": type_})
        return value or 0.0


def read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@contextmanager
def log_records() -> Iterator[list[logging.LogRecord]]:
    """Every record from the server's threads, info and up: fewstep's loggers propagate to the root, uvicorn's
    stop at "uvicorn" (its logging config), so the handler goes on both."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    fewstep, level = logging.getLogger("fewstep"), logging.getLogger("fewstep").level
    fewstep.setLevel(logging.INFO)
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield records
    finally:
        fewstep.setLevel(level)
        for lg in loggers:
            lg.removeHandler(handler)


@pytest.fixture(scope="module")
def served(models_dir) -> Iterator[Served]:
    with Served(models_dir, header_timeout_s=DEADLINE, body_timeout_s=DEADLINE) as s:
        yield s


def test_partial_headers_are_closed_at_the_header_deadline(served):
    socks = [served.connect() for _ in range(50)]
    for s in socks[1:]:  # the first sends nothing at all
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    start = time.monotonic()
    for s in socks:
        assert read_until_closed(s) == b""  # closed, unanswered: there is no request to answer
        s.close()
    assert DEADLINE * 0.8 < time.monotonic() - start < DEADLINE + SLACK

    # keep-alive: the deadline starts again after each response, and headers that arrive in time are served
    with served.connect() as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        time.sleep(DEADLINE / 3)
        s.sendall(b"\r\n")
        data = b""
        while not data.endswith(b"\r\n\r\nok"):  # /healthz's whole answer
            data += s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")
        time.sleep(DEADLINE / 3)  # most of a deadline idle, then partial headers: the timer started at the response
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        start = time.monotonic()
        assert read_until_closed(s) == b""
        assert time.monotonic() - start < DEADLINE + SLACK


def test_a_stalled_upload_is_answered_408_and_its_connection_closed(served):
    before = served.errors("body_timeout")
    with served.connect() as s:
        s.sendall(UPLOAD + b'{"prompt": "a red 7')
        start = time.monotonic()
        status, headers, body = response(read_until_closed(s))
    assert DEADLINE * 0.8 < time.monotonic() - start < DEADLINE + SLACK
    assert status == 408 and headers["connection"] == "close" and headers["x-request-id"]
    assert json.loads(body)["error"] == {
        "message": f"the request body did not arrive within {DEADLINE} s",
        "type": "invalid_request_error",
        "param": None,
        "code": "body_timeout",
    }
    assert served.errors("body_timeout") == before + 1
    with httpx.Client(base_url=served.url) as c:  # the server is fine
        assert c.post("/v1/generate", json={"prompt": "a red 7 on black", "steps": 1}).status_code == 200


def test_a_disconnect_mid_upload_is_a_client_event_not_an_error(served):
    before = {t: served.errors(t) for t in ("client_disconnected", "internal")}
    with log_records() as records:
        for _ in range(3):
            with served.connect() as s:
                s.sendall(UPLOAD + b'{"prompt": "a red 7')
                time.sleep(0.1)  # the request is being handled, its body awaited
        deadline = time.monotonic() + 5
        while served.errors("client_disconnected") < before["client_disconnected"] + 3:
            assert time.monotonic() < deadline, "the disconnects were not counted"
            time.sleep(0.02)
        time.sleep(0.2)
    assert served.errors("internal") == before["internal"]
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert sum("disconnected before sending all of its body" in r.getMessage() for r in records) == 3


def test_a_stalled_upload_does_not_hold_up_shutdown(models_dir):
    with Served(models_dir, body_timeout_s=DEADLINE, drain_grace_s=0) as served, served.connect() as s:
        s.sendall(UPLOAD + b'{"prompt": "a red 7')
        time.sleep(0.1)
        start = time.monotonic()
        served.server.handle_exit(signal.SIGTERM, None)
        served.thread.join(timeout=30)
        assert not served.thread.is_alive()
        assert time.monotonic() - start < DEADLINE + SLACK
        assert response(read_until_closed(s))[0] == 408


def test_a_connection_accepted_just_before_the_listener_closes_gets_its_answer(models_dir):
    """At the end of a drain's grace period uvicorn closes idle connections; one that had no request yet may have
    it on the way: it is answered (told to close), not reset."""
    with Served(models_dir, drain_grace_s=0.2) as served, served.connect() as fresh:
        served.server.handle_exit(signal.SIGTERM, None)
        deadline = time.monotonic() + 10
        while not served.server.should_exit:  # the grace period is over: the listener closes
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.15)  # uvicorn has asked every connection to shut down
        fresh.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        status, headers, _ = response(read_until_closed(fresh))
        assert status == 200 and headers["connection"] == "close"
        served.thread.join(timeout=30)
        assert not served.thread.is_alive()
