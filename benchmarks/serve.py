"""Serving benchmark: latency, HTTP overhead and batching throughput, all in one run on one machine.

    python benchmarks/serve.py --models zoo --out docs/performance.md

Starts `fewstep serve` twice as subprocesses on loopback ports (batching on: max_batch 32; off: max_batch 1)
and measures, with real HTTP clients (benchmarks/loadgen.py's raw HTTP/1.1 connections, so that what is timed is
the server's request path, not a Python client's own cost; one row repeats the 1-step latency through httpx):
- p50/p99 latency of the default (best) student at 1, 2 and 4 steps and of the teacher at its default steps;
- the teacher / 1-step latency ratio;
- HTTP p50 versus in-process generation (+ PNG encoding) of the same 1-step request, and 32 batched clients'
  images/s versus the model's own at batch 32 (one team over every thread, and split as the server runs it), in
  interleaved blocks on one warm server (``compare``: the figure is the median of the blocks' ratios);
- images/s at 1 and 32 concurrent clients, batching on versus off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from loadgen import RawConnection, RawPool  # benchmarks/loadgen.py, beside this script
from split import Layouts  # benchmarks/split.py

from fewstep.server.settings import ServeSettings
from fewstep.server.streams import Streams


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
        wait_ready(self.url, self.proc)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    """Until the server process ``proc`` at ``url`` says /readyz 200 (at most 5 minutes)."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:  # not listening yet: poll again
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


# Send small requests at once: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms per request on loopback.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def sync_client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=300, transport=httpx.HTTPTransport(socket_options=NODELAY))


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's: a shared VM's CPU may change between sessions."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        text = ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def latencies(url: str, payload: dict, n: int, client: str = "raw") -> tuple[str, list[float]]:
    """-> (the model that served, ms per request) for n sequential requests, over one keep-alive connection of
    loadgen's raw client (what the server's request path costs) or of httpx (what an SDK user also pays)."""
    out = []
    if client == "httpx":
        with sync_client(url) as c:
            served_by = c.post("/v1/generate", json=payload).json()["served_by"]  # one more warm-up through HTTP
            for i in range(n):
                t0 = time.perf_counter()
                r = c.post("/v1/generate", json={**payload, "seed": 1000 + i})
                out.append(1000 * (time.perf_counter() - t0))
                r.raise_for_status()
        return served_by, out
    with RawConnection(int(url.rsplit(":", 1)[1])) as c:
        status, body = c.post(payload)  # one more warm-up through HTTP
        if status != 200:
            raise RuntimeError(f"status {status}: {body[:200]!r}")
        served_by = json.loads(body)["served_by"]
        for i in range(n):
            t0 = time.perf_counter()
            status, body = c.post({**payload, "seed": 1000 + i})
            out.append(1000 * (time.perf_counter() - t0))
            if status != 200:
                raise RuntimeError(f"status {status}: {body[:200]!r}")
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


class InProcess:
    """The default student run in this process, as the server runs it but without the request path: the ceiling
    each HTTP figure is compared with. Loaded once, so that a comparison block takes seconds."""

    def __init__(self, model_dir: Path, steps: int, streams: int, graphs: bool):
        from fewstep.models.pipeline import TextToImage

        # every torch call runs on the layouts' threads, loading included, as the server's run on its device
        # threads (Layouts.on_team says why); graphs or eager as the server runs the model
        self.steps, self.layouts = steps, Layouts(None, streams, torch.get_num_threads(), steps)
        self.png_level = ServeSettings().png_compress_level
        self.model = self.layouts.model = self.layouts.on_team(lambda: TextToImage.load(model_dir).use_graphs(graphs))
        self.latency_ms(2)  # warm
        self.layouts.one_team(list(range(32)))
        if streams > 1:
            self.layouts.split(list(range(32)))

    def latency_ms(self, n: int) -> list[float]:
        """n sequential 1-image generations + PNG encoding (at the server's zlib level), what a 1-step request asks
        of the server, on one thread with every core as the server's device thread runs it."""
        return self.layouts.on_team(self._latency_ms, n)

    def _latency_ms(self, n: int) -> list[float]:
        from fewstep.models.images import encode, to_pil

        out = []
        for i in range(n):
            t0 = time.perf_counter()
            image = to_pil(self.model.generate(["a red 7 on black"], [1000 + i], steps=self.steps))[0]
            encode(image, png_level=self.png_level)
            out.append(1000 * (time.perf_counter() - t0))
        return out

    def images_per_s(self, batch: int, batches: int, split: bool = False) -> float:
        """Images/s at ``batch`` images per call, to PIL (before PNG encoding), as one team over every thread or
        split over single-threaded parts at once as the server runs a batch this large on a CPU (server/engine.py
        ``_split``; benchmarks/split.py)."""
        run = self.layouts.split if split else self.layouts.one_team
        t0 = time.perf_counter()
        for r in range(batches):
            run([r * batch + i for i in range(batch)])
        return batches * batch / (time.perf_counter() - t0)

    def close(self) -> None:
        self.layouts.close()


@dataclass
class Block:
    """One comparison block: each side measured right after the other (per block, which goes first alternates)."""

    http_ms: float  # p50 of the block's sequential 1-step requests over HTTP
    local_ms: float  # p50 of the same in-process
    http_32: float  # images/s of 32 closed-loop clients
    local_32: float  # in-process batch 32, one team
    split_32: float | None  # in-process batch 32 split, when the server splits such a batch


def compare(url: str, local: InProcess, payload: dict, blocks: int, requests: int, total: int, splits: bool):
    """HTTP against in-process in ``blocks`` short interleaved blocks on one warm server: on a shared VM whose speed
    moves by tens of percent within seconds, each ratio is taken between measurements a second or two apart, and
    the figure is the median of the blocks' ratios (a single slow stretch moves one block, not the figure)."""

    def served() -> tuple[float, float]:
        return percentile(latencies(url, payload, requests)[1], 50), throughput(url, payload, 32, total)

    def in_process() -> tuple[float, float, float | None]:
        ms = percentile(local.latency_ms(requests), 50)
        team = local.images_per_s(32, total // 32)
        return ms, team, local.images_per_s(32, total // 32, split=True) if splits else None

    out = []
    for b in range(blocks):
        if b % 2 == 0:  # HTTP first
            (http_ms, http_32), (local_ms, local_32, split_32) = served(), in_process()
        else:
            (local_ms, local_32, split_32), (http_ms, http_32) = in_process(), served()
        out.append(Block(http_ms, local_ms, http_32, local_32, split_32))
        split_text = f" / {split_32:.1f}" if split_32 is not None else ""
        text = f"{http_ms:.1f} / {local_ms:.1f} ms, {http_32:.1f} / {local_32:.1f}{split_text} images/s"
        print(f"block {b + 1}/{blocks}: {text}", file=sys.stderr, flush=True)
    return out


def spread(ratios: list[float], fmt: str, unit: str = "") -> str:
    """The median of the blocks' ratios, and the middle half of them: "m (middle half a–b)"."""
    m, q1, q3 = (
        format(x, fmt) + unit for x in (statistics.median(ratios), percentile(ratios, 25), percentile(ratios, 75))
    )
    return f"{m} (middle half {q1}–{q3})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="zoo", help="models directory (default ./zoo)")
    p.add_argument("--requests", type=int, default=40, help="sequential requests per latency row")
    p.add_argument("--total", type=int, default=1024, help="timed requests per throughput row")
    p.add_argument("--out", default="docs/performance.md")
    p.add_argument("--max-batch", type=int, default=32, help="the batching server's max_batch (default 32)")
    p.add_argument("--blocks", type=int, default=8, help="interleaved blocks of the HTTP / in-process comparison")
    p.add_argument("--block-requests", type=int, default=10, help="sequential 1-step requests per side of a block")
    p.add_argument("--block-total", type=int, default=256, help="images per side of a block's throughput (32 × n)")
    args = p.parse_args()
    if args.blocks < 1 or args.block_requests < 1 or args.block_total < 32:
        p.error("--blocks and --block-requests must be at least 1, --block-total at least 32")
    on_flags = dict(max_batch=args.max_batch, max_wait_ms=5, queue_size=512)
    # how the served batches of max_batch run on this machine's CPU (the servers' settings: defaults and FEWSTEP_*
    # variables, which they inherit): split over the streams, or one team over every thread
    served = ServeSettings()
    streams = Streams.resolve(served.cpu_streams, torch.device("cpu"), served.threads or torch.get_num_threads())
    splits = streams.count > 1 and args.max_batch >= streams.count * served.cpu_split_images > 0

    with Server(args.models, **on_flags) as on:
        models = {m["id"]: m for m in httpx.get(on.url + "/v1/models").json()["data"]}
        rows = []
        for steps in (1, 2, 4):  # unnamed requests: the server routes each to the best student for its steps
            served_by, ms = latencies(on.url, {"prompt": "a red 7 on black", "steps": steps}, args.requests)
            rows.append((served_by, steps, ms))
        student = models[rows[0][0]]  # the student that serves unnamed 1-step requests (healthy, fewest steps)
        if student["role"] != "student":
            raise SystemExit(f"no student serves 1-step requests here ({student['id']} did): nothing to compare")
        # its teacher (a models directory may hold more than one teacher, e.g. a compressed one)
        teacher = models.get(student["teacher"]) or next(m for m in models.values() if m["role"] == "teacher")
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
        _, sdk_ms = latencies(on.url, one_step, args.requests, client="httpx")
        tput_on = {c: throughput(on.url, one_step, c, args.total) for c in (1, 32)}
        # HTTP against in-process on this warm server, in interleaved blocks (compare)
        local = InProcess(Path(args.models) / student["id"], one_step["steps"], streams.count, served.cpu_graphs)
        try:
            blocks = compare(on.url, local, one_step, args.blocks, args.block_requests, args.block_total, splits)
        finally:
            local.close()
    with Server(args.models, max_batch=1, max_wait_ms=0, queue_size=512) as off:
        tput_off = {c: throughput(off.url, one_step, c, args.total) for c in (1, 32)}
    n = len(blocks)
    lat_ratio = spread([b.http_ms / b.local_ms for b in blocks], ".2f", "×")
    tput_ratio = spread([b.http_32 / b.local_32 for b in blocks], ".0%")
    split_ratio = spread([b.http_32 / b.split_32 for b in blocks if b.split_32], ".0%") if splits else None
    per_block = "; ".join(
        f"{i + 1}: {b.http_ms:.1f} / {b.local_ms:.1f} ms, {b.http_32:.1f} / {b.local_32:.1f}"
        + (f" / {b.split_32:.1f}" if b.split_32 is not None else "") + " images/s"
        for i, b in enumerate(blocks))  # fmt: skip

    p50 = {(m, s): percentile(xs, 50) for m, s, xs in rows}
    student_1 = p50.get((student["id"], min(student["supported_steps"])))
    teacher_p50 = p50[(teacher["id"], teacher["default_steps"])]
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
        f"| HTTP p50 / in-process p50, 1 step (median of {n} blocks) | {lat_ratio} | ≤ 1.2× |",
        f"| the same through httpx (the SDK's client; its own cost included; against block 1) | "
        f"{percentile(sdk_ms, 50) / blocks[0].local_ms:.2f}× ({percentile(sdk_ms, 50):.1f} ms) | |",
        f"| images/s, 1 client, batching on / off | {tput_on[1]:.1f} / {tput_off[1]:.1f} | |",
        f"| images/s, 32 clients, batching on / off | {tput_on[32]:.1f} / {tput_off[32]:.1f} | |",
        f"| 32 clients batched / serial batch-1 (1 client, batching off) | {tput_on[32] / tput_off[1]:.1f}× | ≥ 5× |",
        f"| 32 clients batched over HTTP / in-process batch 32 (before PNG; median of {n} blocks) | "
        f"{tput_ratio} | ≥ 80% |",
        *(
            [
                f"| the same / in-process batch 32 split over {streams.count} single-threaded parts at once, as the "
                f"server runs it (median of {n} blocks) | {split_ratio} | |"
            ]
            if splits
            else []
        ),  # fmt: skip
    ]
    machine = (
        f"{cpu_name()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, no GPU"
    )
    text = (
        "# Performance\n\n"
        f"Measured by `python benchmarks/serve.py` in one run on one machine ({machine}); the server and its "
        "clients share the machine. Ratios are the figures to compare; absolute times mean little off a GPU.\n\n"
        "## Serving latency (sequential requests over one keep-alive connection, n = 1 image)\n\n"
        + "\n".join(lines)
        + "\n\n"
        "## Summary\n\n" + "\n".join(summary) + "\n\n"
        "HTTP / in-process blocks (1-step p50; images/s at 32 clients / batch 32"
        + (" / batch 32 split" if splits else "")
        + f"): {per_block}.\n"
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
