"""One batch over every thread against the same batch split over single-threaded streams, by batch size.

    python benchmarks/split.py [--model zoo/digits-consistency] [--batches 2 4 8 16 24 32 64] [--rounds 3]

Outside its throughput mode, the server runs a whole batch of at least ``cpu_streams × cpu_split_images`` images
split: one part per stream, each on its own device thread with its share of the torch threads, all at once
(server/engine.py ``_split``). This script measures both layouts of one batch on the model itself, in-process, as
the engine runs them (the split's parts on persistent threads, joined before the next batch), and prints images/s
per batch size: the data behind ``cpu_split_images``' default. A team over every core waits at every op's
barrier; a split part pays none, but each part's ops hold the GIL while torch dispatches them, so small batches,
whose ops are mostly that fixed cost, run better as one team. The model runs as the server runs it: as frozen
graphs unless FEWSTEP_CPU_GRAPHS=false (models/graphs.py). Rounds alternate the layouts (a shared VM's speed
drifts by tens of percent).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

PROMPT = "a red 7 on black"


class Layouts:
    """Runs batches of ``model`` at ``steps`` as one team over ``threads`` threads or split into ``streams`` parts."""

    def __init__(self, model, streams: int, threads: int, steps: int = 1):
        from fewstep.models.images import to_pil
        from fewstep.server.streams import split_batch, use_threads

        self.model, self.streams, self.threads, self.steps = model, streams, threads, steps
        self._to_pil, self._split, self._use = to_pil, split_batch, use_threads
        self.team = ThreadPoolExecutor(1)
        self.parts = [ThreadPoolExecutor(1) for _ in range(streams)]

    def _run(self, seeds: list[int], threads: int) -> int:
        self._use(threads)
        return len(self._to_pil(self.model.generate([PROMPT] * len(seeds), seeds, steps=self.steps)))

    def one_team(self, seeds: list[int]) -> int:
        return self.team.submit(self._run, seeds, self.threads).result()

    def on_team(self, fn, *args):
        """``fn(*args)`` on the team's thread with every thread, as a lone request runs on the server's device thread.
        Run nothing with several threads on any other thread: libgomp keeps a pool of worker threads per thread
        that starts a parallel region, and once it manages more threads than there are cores it parks each worker
        after every region (its throttled spin), which slowed 1-image batches here by a third."""

        def with_every_thread():
            self._use(self.threads)
            return fn(*args)

        return self.team.submit(with_every_thread).result()

    def split(self, seeds: list[int]) -> int:
        parts = self._split(seeds, self.streams, images=lambda _: 1)
        per = max(1, self.threads // self.streams)
        return sum(f.result() for f in [ex.submit(self._run, p, per) for ex, p in zip(self.parts, parts, strict=False)])

    def images_per_s(self, layout: str, batch: int, seconds: float) -> float:
        run = self.one_team if layout == "team" else self.split
        run(list(range(batch)))  # warm: each thread's team and allocator
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            done += run([done + i for i in range(batch)])
        return done / (time.perf_counter() - t0)

    def close(self) -> None:
        for ex in (self.team, *self.parts):
            ex.shutdown(wait=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="zoo/digits-consistency")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8, 16, 24, 32, 64])
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    args = p.parse_args()
    if args.streams < 2 or args.rounds < 1:
        p.error("--streams must be at least 2 and --rounds at least 1")
    from fewstep.models.pipeline import TextToImage
    from fewstep.server.settings import ServeSettings

    # loaded on the team's thread, as the server loads a model on its device thread (Layouts.on_team says why);
    # graphs or eager as the server runs it
    threads = torch.get_num_threads()
    layouts = Layouts(None, args.streams, threads)
    graphs = ServeSettings().cpu_graphs
    layouts.model = layouts.on_team(lambda: TextToImage.load(Path(args.model)).use_graphs(graphs))
    results: dict[tuple[int, str], list[float]] = {}
    try:
        for r in range(args.rounds):
            for batch in args.batches:
                for layout in ("team", "split"):
                    ips = layouts.images_per_s(layout, batch, args.seconds)
                    results.setdefault((batch, layout), []).append(ips)
                    print(f"round {r + 1}, batch {batch}, {layout}: {ips:.1f} images/s", flush=True)
    finally:
        layouts.close()

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    per = max(1, threads // args.streams)
    print(f"\n{Path(args.model).name}, 1 step, {threads} threads; medians of {args.rounds} rounds\n")
    print(f"| batch | one batch over {threads} threads (images/s) | split into {args.streams} parts of {per} thread"
          f"{'s' if per > 1 else ''} (images/s) | split / one |")  # fmt: skip
    print("|---:|---:|---:|---:|")
    for batch in args.batches:
        team, split = median(results[(batch, "team")]), median(results[(batch, "split")])
        print(f"| {batch} | {team:.1f} | {split:.1f} | {split / team:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
