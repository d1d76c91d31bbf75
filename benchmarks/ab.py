"""A/B of server settings in alternating rounds: on a shared VM whose speed drifts by tens of percent within
minutes, two settings are compared only round by round (each round starts a server per setting, one after the
other, and measures it the same way).

A setting is FEWSTEP_* environment variables for `fewstep serve` (docs/api.md lists them); "default" is none.

    python benchmarks/ab.py --mode throughput FEWSTEP_PNG_COMPRESS_LEVEL=6 FEWSTEP_PNG_COMPRESS_LEVEL=1
    python benchmarks/ab.py --mode overload FEWSTEP_THREADS=1 default

- throughput: 32 closed-loop clients, 1-step requests: images/s (as benchmarks/serve.py's 32-client row), and the
  batches from /metrics: mean model ms × images per batch, and batches at once (model seconds per second);
- overload: capacity (32 closed-loop clients for 8 s), then open-loop arrivals at --factor (default 4) times it
  for 12 s: goodput (200s per second) and its share of the capacities measured just before and after (as
  benchmarks/reliability.py's overload section). A factor under 1 shows what open-loop arrivals alone cost,
  without refusals.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import reliability  # benchmarks/reliability.py, beside this script
import serve  # benchmarks/serve.py

ONE_STEP = {"prompt": "a red 7 on black", "steps": 1}


@contextmanager
def environment(setting: str):
    saved = dict(os.environ)
    if setting != "default":
        for pair in setting.split("+"):
            name, _, value = pair.partition("=")
            if not name.startswith("FEWSTEP_") or not value:
                raise SystemExit(f"a setting is FEWSTEP_NAME=VALUE[+...] or default, not {setting!r}")
            os.environ[name] = value
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def throughput(models: str, setting: str) -> str:
    with environment(setting):
        server = serve.Server(models, max_batch=32, max_wait_ms=5, queue_size=512)
    with server as on:
        serve.throughput(on.url, ONE_STEP, 32, 256)  # warm up
        batches, t0 = reliability.batch_totals(on.url), time.perf_counter()
        images_per_s = serve.throughput(on.url, ONE_STEP, 32, 1024)
        at_once = reliability.batches_since(on.url, None, batches, time.perf_counter() - t0)
        return f"{images_per_s:.1f} images/s (batches: model ms × images, at once: {at_once})"


def overload(ctx: reliability.Context, setting: str, factor: float = 4.0) -> str:
    with environment(setting):
        server = ctx.server("ab").start()
    try:
        asyncio.run(reliability.closed_loop(server.port, ctx.auth, 32, 1.0))
        before, _ = asyncio.run(reliability.closed_loop(server.port, ctx.auth, 32, 8.0))
        res = asyncio.run(reliability.open_loop(server.port, ctx.auth, factor * before, 12.0, 512, 30.0))
        after, _ = asyncio.run(reliability.closed_loop(server.port, ctx.auth, 32, 8.0))
        goodput, capacity = res.statuses[200] / res.elapsed, (before + after) / 2
        other = {k: v for k, v in res.statuses.items() if k not in (200, 429)}
        return (
            f"capacity {before:.1f} / {after:.1f}, {factor:g}x goodput {goodput:.1f} "
            f"({100 * goodput / capacity:.0f}%), 429s {res.statuses[429]}, other {other}"
        )
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="+", help="FEWSTEP_NAME=VALUE[+FEWSTEP_OTHER=VALUE] or default")
    p.add_argument("--mode", choices=("throughput", "overload"), default="throughput")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--factor", type=float, default=4.0, help="overload: arrivals at this many times the capacity")
    p.add_argument("--models", default="zoo")
    args = p.parse_args()
    ctx = reliability.Context(mode=reliability.FULL, models=Path(args.models), work=Path(tempfile.mkdtemp()))
    print("| round | setting | result |\n|---:|---|---|")
    for r in range(1, args.rounds + 1):
        for setting in args.settings:
            if args.mode == "throughput":
                result = throughput(args.models, setting)
            else:
                result = overload(ctx, setting, args.factor)
            print(f"| {r} | {setting} | {result} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
