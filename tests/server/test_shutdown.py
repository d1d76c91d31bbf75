"""SIGTERM to `fewstep serve` as a user (or Kubernetes) starts it: /readyz turns 503 at once, requests are still
answered through the grace period with ``Connection: close``, a request in flight completes, a stalled upload is
cut at the drain deadline, and the process exits 0. A second signal exits at once."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.test_deadlines import UPLOAD, Served, read_until_closed, response
from tests.serving import free_port

pytestmark = pytest.mark.slow
GRACE, DRAIN = 1.5, 8.0  # drain_grace_s, drain_timeout_s


def start_serve(models_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = ["--models", str(models_dir), "--port", str(port), "--device", "cpu", "--default-model", "tiny-student"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fewstep.cli", "serve", *args, "--log-level", "info", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:  # not listening yet: poll again
            pass
        assert time.time() < deadline, "server did not become ready"
        time.sleep(0.2)


def wait_in_flight(client: httpx.Client, n: int) -> None:
    """Until ``n`` requests besides this one are being handled."""
    deadline = time.monotonic() + 10
    while f"fewstep_requests_in_flight {n + 1}.0" not in client.get("/metrics").text:
        assert time.monotonic() < deadline, f"not {n} requests in flight"
        time.sleep(0.02)


def test_sigterm_drains_then_exits_0(models_dir):
    flags = ["--drain-grace-s", str(GRACE), "--drain-timeout-s", str(DRAIN), "--body-timeout-s", "60"]
    proc, url = start_serve(models_dir, *flags)
    port = int(url.rsplit(":", 1)[1])
    try:
        pooled = httpx.Client(base_url=url, timeout=30)  # a keep-alive connection, as a client's pool holds
        assert pooled.get("/readyz").status_code == 200
        # in flight when the signal comes, for sure: its body is half sent (the rest comes during the grace period)
        in_flight = socket.create_connection(("127.0.0.1", port), timeout=30)
        body = json.dumps({"prompt": "a red 7 on black", "steps": 1}).encode()
        in_flight.sendall(UPLOAD.replace(b"200", str(len(body)).encode()) + body[:10])
        stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
        stalled.sendall(UPLOAD + b'{"prompt": "a red 7')  # and nothing more: only the drain deadline ends it
        wait_in_flight(pooled, 2)

        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while (r := pooled.get("/readyz")).status_code != 503:  # at once: the signal handler sets it
            assert time.monotonic() - signalled < 1, "/readyz did not turn 503"
        assert r.text == "unavailable: draining: shutting down" and r.headers["connection"] == "close"

        # the grace period: still answered, each answer telling the client to reconnect elsewhere (no resets)
        for r in (pooled.get("/healthz"), pooled.get("/v1/models")):
            assert r.status_code == 200 and r.headers["connection"] == "close", r.text
        in_flight.sendall(body[10:])
        status, headers, answer = response(read_until_closed(in_flight))
        assert status == 200 and headers["connection"] == "close", answer  # in flight: completed
        assert len(json.loads(answer)["images"]) == 1

        time.sleep(max(0.0, signalled + GRACE + 0.5 - time.monotonic()))
        with pytest.raises(httpx.ConnectError):  # after the grace period the listener is closed
            httpx.get(url + "/healthz", timeout=5)

        status, headers, answer = response(read_until_closed(stalled))
        assert status == 503 and headers["connection"] == "close"
        assert json.loads(answer)["error"]["code"] == "shutting_down"
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - signalled < DRAIN + 4  # the stalled upload did not stretch the drain
        log = proc.stdout.read()
        assert "Traceback" not in log and " ERROR " not in log, log
        assert "SIGTERM: draining" in log and "request_id=" in log and "path=/v1/generate" in log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_second_signal_exits_at_once(models_dir):
    with (
        Served(models_dir, drain_grace_s=30) as served,
        httpx.Client(base_url=served.url) as c,
        served.connect() as stalled,
    ):
        stalled.sendall(UPLOAD + b'{"prompt": "a red 7')  # in flight for as long as the drain would wait
        wait_in_flight(c, 1)
        start = time.monotonic()
        served.server.handle_exit(signal.SIGTERM, None)
        assert c.get("/readyz").status_code == 503
        served.server.handle_exit(signal.SIGTERM, None)
        served.thread.join(timeout=30)
        assert time.monotonic() - start < 2 and not served.thread.is_alive()
