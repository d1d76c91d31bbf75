"""Settings precedence, and `fewstep serve` as a user starts it: a subprocess, then SIGTERM."""

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from fewstep.server.settings import load_settings
from tests.serving import free_port


def test_flags_beat_environment_beat_file(tmp_path, monkeypatch):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 9000\nmax_batch: 4\nqueue_size: 7\n")
    monkeypatch.setenv("FEWSTEP_MAX_BATCH", "16")
    monkeypatch.setenv("FEWSTEP_API_KEYS", "a, b")
    s = load_settings(cfg, queue_size=3, host=None)
    assert (s.port, s.max_batch, s.queue_size, s.api_keys) == (9000, 16, 3, ["a", "b"])


def test_bad_settings_are_clear_errors(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("max_batch: 0\n")
    with pytest.raises(ValueError, match="max_batch"):
        load_settings(cfg)
    cfg.write_text("colour: red\n")
    with pytest.raises(ValueError, match="colour"):
        load_settings(cfg)
    with pytest.raises(ValueError, match="not found"):
        load_settings(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_fewstep_serve_serves_then_drains_on_sigterm(models_dir):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fewstep.cli",
            "serve",
            "--models",
            str(models_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--default-model",
            "tiny-student",
            "--log-level",
            "info",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:  # not listening yet: poll again
                pass
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.2)
        # a slow request is in flight when SIGTERM arrives: it must still complete
        result = {}

        def slow():
            result["r"] = httpx.post(
                url + "/v1/generate",
                timeout=60,
                json={"prompt": "a red 7 on black", "model": "tiny-teacher", "steps": 100, "n": 4},
            )

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 4
        # uvicorn drains, then re-raises the signal so the process ends as SIGTERM asks
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert "request_id=" in log and "path=/v1/generate" in log
    finally:
        if proc.poll() is None:
            proc.kill()
