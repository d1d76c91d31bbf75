"""Step-level scheduling: how long a 1-step request waits while clients keep the teacher busy, and what the
teacher's throughput pays for it, with step scheduling on and off, in one run on one machine.

    python benchmarks/scheduling.py --models zoo --out docs/performance.md

Two `fewstep serve` subprocesses on loopback ports (benchmarks/serve.py's Server), one with step scheduling and
one without (``--no-step-scheduling``: each batch to its end, as before), both up for the whole run and loaded one
at a time, so that the slow drift of a shared VM's speed falls on both alike:

- the teacher's own throughput: ``--teacher-clients`` closed-loop clients on one server for ``--window-s``, then
  on the other, alternating for ``--rounds`` rounds (which server goes first alternates too). Each window's rate
  is counted between its first and last completions (images finished after the first / the time between them),
  so that completions arriving four at a time (whole batches, scheduling off) are not miscounted by the window's
  edges; a mode's rate pools its windows (images / seconds);
- a 1-step client's sequential requests on the idle server, then while the teacher clients run.

Figures (issue 15): 1-step p99 under teacher load ≤ 3× its idle p99; teacher images/s on its own within 10% of
scheduling off.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import httpx
from loadgen import RawPool
from report import publish_section
from serve import Server, percentile

WARM_S = 3.0  # closed-loop clients run this long before a window counts: batches reach their steady size


async def _sequential(port: int, payload: dict, n: int) -> list[float]:
    pool, out = RawPool(port, payload), []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = await pool.post()
        out.append(1000 * (time.perf_counter() - t0))
        if status != 200:
            raise RuntimeError(f"status {status}")
    pool.close()
    return out


class TeacherLoad:
    """``clients`` closed-loop clients sending ``payload``; ``done`` holds (time, images) per completion."""

    def __init__(self, port: int, payload: dict, clients: int):
        self.pool, self.payload, self.clients = RawPool(port, payload), payload, clients
        self.done: list[tuple[float, int]] = []
        self.stop = asyncio.Event()

    async def __aenter__(self) -> TeacherLoad:
        self.workers = [asyncio.create_task(self._worker()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        await asyncio.gather(*self.workers)  # requests in flight finish: the next window starts on an idle server
        self.pool.close()

    async def _worker(self) -> None:
        while not self.stop.is_set():
            status, _ = await self.pool.post()
            if status != 200:
                raise RuntimeError(f"teacher status {status}")
            self.done.append((time.perf_counter(), self.payload.get("n", 1)))

    def rate_since(self, start: float) -> tuple[int, float]:
        """-> (images finished after the first completion since ``start``, seconds from it to the last)."""
        window = [(t, n) for t, n in self.done if t >= start]
        if len(window) < 2:
            return 0, 0.0
        first = window[0][0]
        last = max(t for t, _ in window)
        return sum(n for t, n in window if t > first), last - first


async def _alone_window(port: int, teacher: dict, clients: int, window_s: float) -> tuple[int, float]:
    async with TeacherLoad(port, teacher, clients) as load:
        await asyncio.sleep(WARM_S)
        start = time.perf_counter()
        await asyncio.sleep(window_s)
        return load.rate_since(start)  # before the clients stop: their last requests are not counted


async def _busy(port: int, student: dict, teacher: dict, clients: int, n: int) -> tuple[list[float], float]:
    """-> (the 1-step client's ms per request, the teacher's images/s meanwhile)."""
    async with TeacherLoad(port, teacher, clients) as load:
        await asyncio.sleep(WARM_S)
        start = time.perf_counter()
        ms = await _sequential(port, student, n)
        end = time.perf_counter()  # a short phase: images finished within it over its length
        return ms, sum(i for t, i in load.done if start <= t <= end) / (end - start)


async def _run(ports: dict[str, int], student: dict, teacher: dict, args) -> dict:
    out = {mode: {"windows": []} for mode in ports}
    for mode, port in ports.items():
        out[mode]["idle"] = await _sequential(port, student, args.requests)
    for r in range(args.rounds):
        order = list(ports) if r % 2 == 0 else list(reversed(ports))
        for mode in order:
            images, seconds = await _alone_window(ports[mode], teacher, args.teacher_clients, args.window_s)
            out[mode]["windows"].append((images, seconds))
            print(f"round {r + 1}/{args.rounds} {mode}: {images / max(seconds, 1e-9):.2f} teacher images/s", flush=True)
    for mode, port in ports.items():
        busy = await _busy(port, student, teacher, args.teacher_clients, args.requests)
        out[mode]["busy"], out[mode]["beside"] = busy
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="zoo")
    p.add_argument("--requests", type=int, default=60, help="1-step requests per row, idle and busy")
    p.add_argument("--teacher-clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4, help="alternating windows of the teacher's own throughput")
    p.add_argument("--window-s", type=float, default=20.0, help="seconds each throughput window counts")
    p.add_argument("--out", default="docs/performance.md")
    args = p.parse_args()
    with Server(args.models, max_batch=8) as on, Server(args.models, max_batch=8, no_step_scheduling=None) as off:
        models = {m["id"]: m for m in httpx.get(on.url + "/v1/models").json()["data"]}
        student = next(m for m in models.values() if m["default"])
        teacher = models[student["teacher"]]
        one = {"prompt": "a red 7 on black", "steps": 1}
        slow = {"prompt": "a blue 3 on white", "model": teacher["id"]}
        rows = asyncio.run(_run({"on": on.port, "off": off.port}, one, slow, args))

    def rate(windows: list[tuple[int, float]]) -> float:
        return sum(i for i, _ in windows) / sum(s for _, s in windows)

    lines = [
        "| step scheduling | 1-step p50 idle | 1-step p99 idle | 1-step p50 busy | 1-step p99 busy | p99 busy / idle "
        "| teacher images/s alone (per window) | teacher images/s beside the 1-step client |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for mode, r in rows.items():
        idle, busy = r["idle"], r["busy"]
        per = ", ".join(f"{i / s:.2f}" for i, s in r["windows"])
        lines.append(
            f"| {mode} | {percentile(idle, 50):.1f} ms | {percentile(idle, 99):.1f} ms | {percentile(busy, 50):.1f} ms "
            f"| {percentile(busy, 99):.1f} ms | {percentile(busy, 99) / percentile(idle, 99):.2f}× "
            f"| **{rate(r['windows']):.2f}** ({per}) | {r['beside']:.2f} |"
        )
    on, off = rows["on"], rows["off"]
    ratio = percentile(on["busy"], 99) / percentile(on["idle"], 99)
    pairs = [(a[0] / a[1]) / (b[0] / b[1]) for a, b in zip(on["windows"], off["windows"], strict=True)]
    lines += [
        "",
        f"With step scheduling on: 1-step p99 under teacher load / idle = {ratio:.2f}× (target ≤ 3×); the "
        f"teacher's images/s on its own, on / off = {rate(on['windows']) / rate(off['windows']):.2f} (target ≥ 0.90; "
        f"per round {', '.join(f'{x:.2f}' for x in pairs)}, median {statistics.median(pairs):.2f}); "
        f"beside the 1-step client, on / off = "
        f"{on['beside'] / off['beside']:.2f} (on, the 1-step requests take their share of the device instead of "
        f"waiting for whole teacher batches). "
        f"{args.teacher_clients} closed-loop teacher clients ({teacher['id']}, {teacher['default_steps']} steps, "
        f"n = 1) in {args.rounds} alternating {args.window_s:.0f} s windows per mode; {args.requests} sequential "
        f"1-step requests per row ({student['id']}), max_batch 8; both servers up for the whole run, loaded one "
        f"at a time; `python benchmarks/scheduling.py --models {args.models} --requests {args.requests} "
        f"--rounds {args.rounds} --window-s {args.window_s:g}`.",
    ]
    return publish_section(args.out, "Step-level scheduling", lines)


if __name__ == "__main__":
    sys.exit(main())
