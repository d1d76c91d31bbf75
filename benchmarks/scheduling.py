"""Step-level scheduling: how long a 1-step request waits while clients keep the teacher busy, and what the
teacher's throughput pays for it, with step scheduling on and off, in one run on one machine.

    python benchmarks/scheduling.py --models zoo --out docs/performance.md

For each mode a `fewstep serve` subprocess on a loopback port (benchmarks/serve.py's Server): a 1-step client sends
sequential requests on the idle server, then again while ``--teacher-clients`` closed-loop clients keep the
teacher busy at its default steps; the teacher clients' images/s is counted over the same window.
Figures (issue 15): 1-step p99 under teacher load ≤ 3× its idle p99, teacher images/s within 10% of
scheduling off (each batch to its end, as before).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx
from loadgen import RawPool
from report import replace_section
from serve import Server, percentile


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


async def _scenario(port: int, student: dict, teacher: dict, clients: int, n: int, warm_s: float, alone_s: float):
    idle = await _sequential(port, student, n)
    pool, done, stop = RawPool(port, teacher), [0], asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            status, _ = await pool.post()
            if status != 200:
                raise RuntimeError(f"teacher status {status}")
            done[0] += teacher.get("n", 1)

    workers = [asyncio.create_task(worker()) for _ in range(clients)]
    await asyncio.sleep(warm_s)
    # the teacher's throughput on its own (the cost of running it step by step), then with the 1-step client
    start_images, t0 = done[0], time.perf_counter()
    await asyncio.sleep(alone_s)
    alone_rate = (done[0] - start_images) / (time.perf_counter() - t0)
    start_images, t0 = done[0], time.perf_counter()
    busy = await _sequential(port, student, n)
    teacher_rate = (done[0] - start_images) / (time.perf_counter() - t0)
    stop.set()
    await asyncio.gather(*workers)
    pool.close()
    return idle, busy, teacher_rate, alone_rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="zoo")
    p.add_argument("--requests", type=int, default=60, help="1-step requests per row")
    p.add_argument("--teacher-clients", type=int, default=4)
    p.add_argument("--alone-s", type=float, default=30.0, help="seconds the teacher's own throughput is counted")
    p.add_argument("--out", default="docs/performance.md")
    args = p.parse_args()
    rows = {}
    for mode, flags in (("on", {}), ("off", {"no_step_scheduling": None})):
        with Server(args.models, max_batch=8, **flags) as server:
            models = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
            student = next(m for m in models.values() if m["default"])
            teacher = models[student["teacher"]]
            one = {"prompt": "a red 7 on black", "steps": 1}
            slow = {"prompt": "a blue 3 on white", "model": teacher["id"]}
            scenario = _scenario(server.port, one, slow, args.teacher_clients, args.requests, 3.0, args.alone_s)
            rows[mode] = asyncio.run(scenario)
    lines = [
        "| step scheduling | 1-step p50 idle | 1-step p99 idle | 1-step p50 busy | 1-step p99 busy | p99 busy / idle "
        "| teacher images/s alone | teacher images/s beside the 1-step client |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, (idle, busy, rate, alone) in rows.items():
        lines.append(
            f"| {mode} | {percentile(idle, 50):.1f} ms | {percentile(idle, 99):.1f} ms | {percentile(busy, 50):.1f} ms "
            f"| {percentile(busy, 99):.1f} ms | {percentile(busy, 99) / percentile(idle, 99):.2f}× | {alone:.2f} "
            f"| {rate:.2f} |"
        )
    on, off = rows["on"], rows["off"]
    ratio = percentile(on[1], 99) / percentile(on[0], 99)
    lines += [
        "",
        f"With step scheduling on: 1-step p99 under teacher load / idle = {ratio:.2f}× (target ≤ 3×); the "
        f"teacher's images/s on its own, on / off = {on[3] / off[3]:.2f} (target ≥ 0.90); beside the 1-step "
        f"client, on / off = {on[2] / off[2]:.2f} (on, the 1-step requests take their share of the device "
        f"instead of waiting for whole teacher batches). {args.teacher_clients} closed-loop teacher "
        f"clients ({teacher['id']}, {teacher['default_steps']} steps, n = 1), {args.requests} sequential 1-step "
        f"requests per row ({student['id']}), max_batch 8; "
        f"`python benchmarks/scheduling.py --models {args.models} --requests {args.requests}`.",
    ]
    text = "\n".join(lines) + "\n"
    replace_section(args.out, "Step-level scheduling", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
