"""Serving benchmark: latency, HTTP overhead and batching throughput, all in one run on one machine.

    python benchmarks/serve.py --models zoo --out docs/performance.md

Starts `fewstep serve` twice as subprocesses on loopback ports (batching on: max_batch 32; off: max_batch 1)
and measures, with real HTTP clients:
- p50/p99 latency of the default (best) student at 1, 2 and 4 steps and of the teacher at its default steps;
- the teacher / 1-step latency ratio;
- HTTP p50 versus in-process generation (+ PNG encoding) of the same 1-step request;
- images/s at 1 and 32 concurrent clients, batching on versus off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from loadgen import RawPool  # benchmarks/loadgen.py, beside this script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, models: str, **flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "fewstep.cli",
            "serve",
            "--models",
            models,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        for k, v in flags.items():  # a value of None: a bare flag (--no-step-scheduling)
            cmd += [f"--{k.replace('_', '-')}", *([] if v is None else [str(v)])]
        self.proc = subprocess.Popen(cmd)

    def __enter__(self) -> Server:
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:  # not listening yet: poll again
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


# Send small requests at once: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms per request on loopback.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def sync_client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=300, transport=httpx.HTTPTransport(socket_options=NODELAY))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def latencies(url: str, payload: dict, n: int) -> tuple[str, list[float]]:
    """-> (the model that served, ms per request) for n sequential requests."""
    out = []
    with sync_client(url) as c:
        served_by = c.post("/v1/generate", json=payload).json()["served_by"]  # one more warm-up through HTTP
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post("/v1/generate", json={**payload, "seed": 1000 + i})
            out.append(1000 * (time.perf_counter() - t0))
            r.raise_for_status()
    return served_by, out


async def _throughput(url: str, payload: dict, clients: int, total: int) -> float:
    """Steady-state images/s of ``clients`` closed-loop clients: every client sends one request to warm up and
    fill the pipeline, then ``total`` requests are timed. The clients are benchmarks/loadgen.py's raw HTTP/1.1
    connections, so that they take as little as they can of the cores the server runs on."""
    pool = RawPool(int(url.rsplit(":", 1)[1]), payload)
    sent = 0

    async def worker(n: int | None) -> None:
        nonlocal sent
        while (sent < total) if n is None else n > 0:
            if n is None:
                sent += 1
            else:
                n -= 1
            status, _ = await pool.post()
            if status != 200:
                raise RuntimeError(f"status {status}")

    await asyncio.gather(*(worker(1) for _ in range(clients)))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(None) for _ in range(clients)))
    pool.close()
    return total / (time.perf_counter() - t0)


def throughput(url: str, payload: dict, clients: int, total: int) -> float:
    return asyncio.run(_throughput(url, payload, clients, total))


def in_process_ms(model_dir: Path, steps: int, n: int) -> list[float]:
    from fewstep.models.images import encode, to_pil
    from fewstep.models.pipeline import TextToImage

    model = TextToImage.load(model_dir)
    model.generate(["warm up"], [0], steps=steps)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        encode(to_pil(model.generate(["a red 7 on black"], [1000 + i], steps=steps))[0])
        out.append(1000 * (time.perf_counter() - t0))
    return out


def in_process_images_per_s(model_dir: Path, steps: int, batch: int, rounds: int) -> float:
    """Images/s of the model itself at ``batch`` images per call, to PIL (before PNG encoding): the ceiling that
    batched HTTP serving is compared with."""
    from fewstep.models.images import to_pil
    from fewstep.models.pipeline import TextToImage

    model = TextToImage.load(model_dir)
    prompts = ["a red 7 on black"] * batch
    to_pil(model.generate(prompts, list(range(batch)), steps=steps))
    t0 = time.perf_counter()
    for r in range(rounds):
        to_pil(model.generate(prompts, [r * batch + i for i in range(batch)], steps=steps))
    return rounds * batch / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="zoo", help="models directory (default ./zoo)")
    p.add_argument("--requests", type=int, default=40, help="sequential requests per latency row")
    p.add_argument("--total", type=int, default=1024, help="timed requests per throughput row")
    p.add_argument("--out", default="docs/performance.md")
    p.add_argument("--max-batch", type=int, default=32, help="the batching server's max_batch (default 32)")
    args = p.parse_args()

    with Server(args.models, max_batch=args.max_batch, max_wait_ms=5, queue_size=512) as on:
        models = {m["id"]: m for m in httpx.get(on.url + "/v1/models").json()["data"]}
        student = next(m for m in models.values() if m["default"])
        # the default student's teacher (a models directory may hold more than one teacher, e.g. a compressed one)
        teacher = models.get(student["teacher"]) or next(m for m in models.values() if m["role"] == "teacher")
        rows = []
        for steps in (1, 2, 4):  # unnamed requests: the server routes each to the best student for its steps
            served_by, ms = latencies(on.url, {"prompt": "a red 7 on black", "steps": steps}, args.requests)
            rows.append((served_by, steps, ms))
        served_by, ms = latencies(
            on.url, {"prompt": "a red 7 on black", "model": teacher["id"]}, max(5, args.requests // 4)
        )
        rows.append((served_by, teacher["default_steps"], ms))
        # a guidance-distilled model (one forward per step where CFG takes two) at the teacher's step count
        guided = [m for m in models.values() if m["role"] == "student" and m["guidance"]["input"]
                  and m["default_steps"] == models.get(m.get("teacher"), teacher)["default_steps"]]  # fmt: skip
        for m in guided:  # against its own CFG teacher (the default student's may be another, e.g. a compressed one)
            for name in (m.get("teacher"), m["id"]):
                if name in models and not any(r[0] == name for r in rows):
                    served_by, ms = latencies(
                        on.url, {"prompt": "a red 7 on black", "model": name}, max(5, args.requests // 4)
                    )
                    rows.append((served_by, models[name]["default_steps"], ms))
        one_step = {"prompt": "a red 7 on black", "steps": min(student["supported_steps"])}
        tput_on = {c: throughput(on.url, one_step, c, args.total) for c in (1, 32)}
    with Server(args.models, max_batch=1, max_wait_ms=0, queue_size=512) as off:
        tput_off = {c: throughput(off.url, one_step, c, args.total) for c in (1, 32)}
    local = in_process_ms(Path(args.models) / student["id"], one_step["steps"], args.requests)
    local_32 = in_process_images_per_s(Path(args.models) / student["id"], one_step["steps"], 32, args.total // 32)

    p50 = {(m, s): percentile(xs, 50) for m, s, xs in rows}
    student_1 = p50.get((student["id"], min(student["supported_steps"])))
    teacher_p50 = p50[(teacher["id"], teacher["default_steps"])]
    import torch

    lines = [
        "| model | steps | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        *[f"| {m} | {s} | {percentile(xs, 50):.1f} | {percentile(xs, 99):.1f} |" for m, s, xs in rows],
    ]
    summary = [
        "| figure | value | target |",
        "|---|---:|---:|",
        f"| teacher p50 / 1-step student p50 | {teacher_p50 / student_1:.1f}× | ≥ 40× |",
        *[
            f"| CFG teacher {m['teacher']} p50 / guidance-distilled {m['id']} p50, {m['default_steps']} steps | "
            f"{p50[(m['teacher'], m['default_steps'])] / p50[(m['id'], m['default_steps'])]:.2f}× "
            "| ≈ 2× (one forward per step, not two) |"
            for m in guided
            if (m["id"], m["default_steps"]) in p50 and (m.get("teacher"), m["default_steps"]) in p50
        ],
        f"| HTTP p50 / in-process p50, 1 step | {student_1 / percentile(local, 50):.2f}× "
        f"({student_1:.1f} / {percentile(local, 50):.1f} ms) | ≤ 1.2× |",
        f"| images/s, 1 client, batching on / off | {tput_on[1]:.1f} / {tput_off[1]:.1f} | |",
        f"| images/s, 32 clients, batching on / off | {tput_on[32]:.1f} / {tput_off[32]:.1f} | |",
        f"| 32 clients batched / serial batch-1 (1 client, batching off) | {tput_on[32] / tput_off[1]:.1f}× | ≥ 5× |",
        f"| 32 clients batched over HTTP / in-process batch 32 (before PNG) | {tput_on[32] / local_32:.0%} "
        f"({tput_on[32]:.1f} / {local_32:.1f} images/s) | ≥ 80% |",
    ]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, no GPU"
    )
    text = (
        "# Performance\n\n"
        f"Measured by `python benchmarks/serve.py` in one run on one machine ({machine}); the server and its "
        "clients share the machine. Ratios are the figures to compare; absolute times mean little off a GPU.\n\n"
        "## Serving latency (sequential requests, n = 1 image)\n\n" + "\n".join(lines) + "\n\n"
        "## Summary\n\n" + "\n".join(summary) + "\n"
    )
    out = Path(args.out)
    previous = out.read_text() if out.exists() else ""
    marker = "\n## Reading these numbers"  # hand-written below the measured part: kept
    tail = previous[previous.index(marker) :] if marker in previous else ""
    out.write_text(text + tail)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
