"""Where the time between two batches goes when 32 closed-loop clients keep a batching server in lockstep.

With 32 clients and batches of 32 the device waits, after each batch, while the event loop answers the batch and
reads the next 32 requests; that gap is what separates the served images/s from the model's own. This script
times it from inside the server: it starts `fewstep serve` in a child process with timestamps hooked onto the
engine and uvicorn (batch start and end, each response sent, each request's headers in, each job queued, each
model call), runs the clients, and prints the medians over the last batches, in milliseconds after the device's
end of a batch; then the batch's own length, and its fastest and slowest model call (the parts of a split batch
run at once: the batch lasts as long as its slowest).

    python benchmarks/batch_gap.py [--models zoo] [--model NAME] [--rounds 24] [--max-wait-ms 5]

Diagnostic only: the hooks add a little to every event they time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import serve  # benchmarks/serve.py, beside this script


def _child(events_file: str, argv: list[str]) -> None:
    """The server process: fewstep serve with timestamps on the events above, written out at exit."""
    import atexit

    from uvicorn.protocols.http import h11_impl

    from fewstep.cli import main
    from fewstep.server import engine

    events: list[tuple[str, float, int]] = []
    now = time.perf_counter

    # a whole batch from the event loop's side: its start, and its end as the loop sees it (a batch may run
    # split into parts on several device threads at once, engine._split)
    def wrap_whole(whole):
        async def timed(self, batch):
            events.append(("device_start", now(), len(batch)))
            return await whole(self, batch)

        return timed

    def wrap_finish(finish):
        def timed(self, batch, results):
            events.append(("device_end", now(), len(batch)))
            return finish(self, batch, results)

        return timed

    # each model call on its device thread: a whole batch, or one part of a split batch (its duration)
    def wrap_run(run):
        def timed(self, batch, *a, **kw):
            t0 = now()
            try:
                return run(self, batch, *a, **kw)
            finally:
                events.append(("part", now(), len(batch), now() - t0))  # list.append: safe from any thread

        return timed

    def wrap_enqueue(enqueue):
        def timed(self, job):
            events.append(("queued", now(), 0))
            return enqueue(self, job)

        return timed

    def wrap_cycle(init):
        def timed(self, *a, **kw):
            events.append(("headers", now(), 0))
            return init(self, *a, **kw)

        return timed

    def wrap_send(send):
        async def timed(self, message):
            await send(self, message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                events.append(("sent", now(), 0))

        return timed

    engine.Engine._whole = wrap_whole(engine.Engine._whole)
    engine.Engine._finish = wrap_finish(engine.Engine._finish)
    engine.Engine._enqueue = wrap_enqueue(engine.Engine._enqueue)
    engine.Engine._run_batch = wrap_run(engine.Engine._run_batch)
    h11_impl.RequestResponseCycle.__init__ = wrap_cycle(h11_impl.RequestResponseCycle.__init__)
    h11_impl.RequestResponseCycle.send = wrap_send(h11_impl.RequestResponseCycle.send)
    atexit.register(lambda: Path(events_file).write_text(json.dumps(events)))
    sys.argv = ["fewstep", "serve", *argv]
    main()


def gaps(events: list, last: int) -> dict[str, float]:
    """Medians over the last ``last`` full batches (32 images) that directly follow another one: ms after the
    first one's end, counting only the events before the second one starts (the gap's own)."""
    batches = [i for i, e in enumerate(events) if e[0] in ("device_start", "device_end")]
    rows = []
    for a, s, b in zip(batches, batches[1:], batches[2:], strict=False):
        kinds = (events[a][0], events[s][0], events[b][0])
        if kinds != ("device_end", "device_start", "device_end") or events[a][2] != 32 or events[s][2] != 32:
            continue
        t0, gap = events[a][1], events[a : s + 1]

        def at(kind: str, pick, gap=gap, t0=t0) -> float | None:
            times = [e[1] for e in gap if e[0] == kind]
            return 1000 * (pick(times) - t0) if times else None

        row = {
            "last response sent": at("sent", max), "first request's headers in": at("headers", min),
            "last request's headers in": at("headers", max), "last job queued": at("queued", max),
            "next batch starts (the gap)": at("device_start", min),
            "the batch itself": 1000 * (events[b][1] - events[s][1]),
        }  # fmt: skip
        parts = [1000 * e[3] for e in events[s:b] if e[0] == "part"]  # its model calls: one, or a split's parts
        row["its fastest part (model call)"] = min(parts, default=None)
        row["its slowest part"] = max(parts, default=None)
        if None not in row.values():
            rows.append(row)
    rows = rows[-last:]
    if not rows:
        raise SystemExit("no batch of 32 followed another with requests between them: the clients were not in lockstep")
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="zoo")
    p.add_argument("--model", help="the model the requests name (default: none, the server's choice for 1 step)")
    p.add_argument("--rounds", type=int, default=24, help="timed batches of 32 (after 8 to warm up)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's max_wait_ms (default 5, as serve.py)")
    args = p.parse_args()
    events_file = Path(tempfile.mkdtemp()) / "events.json"
    port = serve.free_port()
    flags = ["--models", args.models, "--port", str(port), "--log-level", "warning", "--max-batch", "32",
             "--max-wait-ms", str(args.max_wait_ms), "--queue-size", "512", "--drain-grace-s", "0"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(events_file), *flags])
    try:
        serve.wait_ready(f"http://127.0.0.1:{port}", proc)
        one_step = {"prompt": "a red 7 on black", "steps": 1, **({"model": args.model} if args.model else {})}
        images_per_s = serve.throughput(f"http://127.0.0.1:{port}", one_step, 32, 32 * (8 + args.rounds))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    medians = gaps(json.loads(events_file.read_text()), args.rounds)
    print(f"32 closed-loop clients, batches of 32, 1 step: {images_per_s:.1f} images/s\n")
    print("| event (median over the timed batches) | ms after the device's end of a batch |\n|---|---:|")
    for k, v in medians.items():
        print(f"| {k} | {v:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
