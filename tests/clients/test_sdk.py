"""The SDK and `fewstep generate` end to end, against a real uvicorn server on a free port."""

import asyncio
import subprocess
import sys
import time

import pytest

from fewstep.clients.sdk import AsyncFewstepClient, FewstepClient, FewstepError
from tests.serving import LiveServer, make_settings

pytestmark = pytest.mark.slow  # every test here talks to a real server over a socket


def test_generate_typed_result(live):
    with FewstepClient(live.url) as client:
        assert client.ready()
        result = client.generate("a red 7 on black", steps=2, n=2, seed=5)
        assert [im.seed for im in result.images] == [5, 6]
        assert result.images[0].pil().size == (32, 32)
        assert result.served_by == "tiny-student" and result.fallback_reason is None and result.steps == 2
        assert result.timings.total_ms > 0 and result.request_id
        fallback = client.generate("a red 7 on black", steps=9)
        assert fallback.served_by == "tiny-teacher" and fallback.fallback_reason == "steps_unsupported"
        assert {m["id"] for m in client.models()} >= {"tiny-student", "tiny-teacher"}


def test_errors_carry_the_servers_message(live):
    with FewstepClient(live.url) as client, pytest.raises(FewstepError) as info:
        client.generate("a red 7 on black", n=99)
    assert info.value.status == 400 and info.value.param == "n" and "at most" in info.value.message


def test_async_client(live):
    async def run():
        async with AsyncFewstepClient(live.url) as client:
            results = await asyncio.gather(*(client.generate("a blue 3 on white", seed=i) for i in range(4)))
            return results

    results = asyncio.run(run())
    assert [r.images[0].seed for r in results] == [0, 1, 2, 3]


def test_retries_429_honouring_retry_after(models_dir):
    settings = make_settings(models_dir, queue_size=1, max_batch=1, warmup=False, retry_after_s=1)
    with LiveServer(settings) as server:

        async def run():
            async with AsyncFewstepClient(server.url, max_retries=10, backoff_s=0.01) as client:
                t0 = time.perf_counter()
                results = await asyncio.gather(
                    *(client.generate("a red 7 on black", model="tiny-teacher", steps=60, seed=i) for i in range(4))
                )
                return results, time.perf_counter() - t0

        results, elapsed = asyncio.run(run())
    assert len(results) == 4 and all(r.served_by == "tiny-teacher" for r in results)
    assert elapsed >= 1.0  # someone was told to come back after Retry-After: 1 and waited for it


def test_fewstep_generate_cli(live, tmp_path):
    out = tmp_path / "img.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fewstep.cli",
            "generate",
            "a red 7 on black",
            "--url",
            live.url,
            "--steps",
            "1",
            "-n",
            "2",
            "--seed",
            "3",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "img-0.png").exists() and (tmp_path / "img-1.png").exists()
    assert "served by tiny-student in 1 steps" in r.stdout and "seeds [3, 4]" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "fewstep.cli", "generate", "x", "--url", live.url, "-n", "2", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "already exists" in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fewstep.cli",
            "generate",
            "x",
            "--url",
            "http://127.0.0.1:9",
            "-o",
            str(tmp_path / "y.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "cannot reach" in r.stderr and "Traceback" not in r.stderr


def test_auto_steps_through_the_sdk_and_the_cli(live, tmp_path):
    with FewstepClient(live.url) as client:
        roomy = client.generate("a red 7 on black", steps="auto", latency_slo_ms=600_000)
        tight = client.generate("a red 7 on black", steps="auto", latency_slo_ms=1e-6)
    assert roomy.served_by == "tiny-teacher" and roomy.auto["latency_slo_ms"] == 600_000
    assert (tight.served_by, tight.steps) == ("tiny-student", 1) and tight.auto["predicted_ms"] > 1e-6
    out = tmp_path / "auto.png"
    r = subprocess.run(
        [sys.executable, "-m", "fewstep.cli", "generate", "a red 7 on black", "--url", live.url, "--steps", "auto",
         "--latency-slo-ms", "0.000001", "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "served by tiny-student in 1 steps" in r.stdout and "steps auto: predicted" in r.stdout
    assert out.read_bytes().startswith(b"\x89PNG")
