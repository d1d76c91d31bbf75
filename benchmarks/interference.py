"""What a core taken by other work costs the model: one batch over every thread (one OpenMP team, the server's
latency mode) against one single-threaded batch per core (its CPU throughput mode, server/streams.py).

    python benchmarks/interference.py [--model zoo/digits-consistency] [--batch 32] [--rounds 3] [--seconds 5]

For each layout it runs 1-step batches for a few seconds, alone and beside another process that keeps one core
busy for a share of every millisecond (as an event loop answering and refusing requests does), and prints the
images/s and what the interference cost. A team waits at every op's barrier for its slowest thread, so a core
taken for 10% of the time can cost it more than the 5% of the machine that was taken; a single-threaded batch
loses only its own time. Rounds alternate the layouts (a shared VM's speed drifts by tens of percent).
"""

from __future__ import annotations

import argparse
import multiprocessing
import threading
import time
from pathlib import Path

import torch

PROMPT = "a red 7 on black"
DUTIES = (0.0, 0.1, 0.25)  # share of each millisecond the other process keeps a core busy


def burn(duty: float, stop) -> None:
    """Keeps one core busy ``duty`` of every millisecond until ``stop`` is set."""
    period = 0.001
    while not stop.is_set():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < duty * period:
            pass
        time.sleep(period * (1 - duty))


def images_per_s(model, batch: int, streams: int, threads: int, seconds: float) -> float:
    """``streams`` threads each running batches with ``threads`` torch threads for ``seconds``: images/s."""
    done, start = [0] * streams, threading.Barrier(streams + 1)
    prompts = [PROMPT] * batch

    def stream(k: int) -> None:
        torch.set_num_threads(threads)  # this thread's count (OpenMP's is per thread)
        model.generate(prompts, list(range(batch)), steps=1)  # warm: this thread's team, allocator
        start.wait()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            model.generate(prompts, list(range(batch)), steps=1)
            done[k] += batch

    workers = [threading.Thread(target=stream, args=(k,)) for k in range(streams)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - t0)


def measure(model, batch: int, streams: int, threads: int, duty: float, seconds: float) -> float:
    stop = multiprocessing.Event()
    other = multiprocessing.Process(target=burn, args=(duty, stop)) if duty else None
    if other is not None:
        other.start()
    try:
        return images_per_s(model, batch, streams, threads, seconds)
    finally:
        stop.set()
        if other is not None:
            other.join()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="zoo/digits-consistency")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = p.parse_args()
    from fewstep.models.pipeline import TextToImage

    cores = torch.get_num_threads()
    model = TextToImage.load(Path(args.model))
    layouts = {f"one batch over {cores} threads": (1, cores), f"{cores} batches of 1 thread": (cores, 1)}
    results: dict[str, dict[float, list[float]]] = {name: {d: [] for d in DUTIES} for name in layouts}
    for r in range(args.rounds):
        for duty in DUTIES:
            for name, (streams, threads) in layouts.items():
                ips = measure(model, args.batch, streams, threads, duty, args.seconds)
                results[name][duty].append(ips)
                print(f"round {r + 1}, {name}, other process {duty:.0%}: {ips:.1f} images/s", flush=True)
    torch.set_num_threads(cores)

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    heads = [f"beside {d:.0%} of a core" for d in DUTIES if d]
    print(f"\n{Path(args.model).name}, batch {args.batch}, 1 step, {cores} threads; medians of {args.rounds} rounds\n")
    print("| layout | alone (images/s) | " + " | ".join(heads) + " |")
    print("|---|---:|" + "---:|" * len(heads))
    for name, by_duty in results.items():
        alone = median(by_duty[0.0])
        cells = [f"{median(by_duty[d]):.1f} ({100 * (median(by_duty[d]) / alone - 1):+.0f}%)" for d in DUTIES if d]
        print(f"| {name} | {alone:.1f} | " + " | ".join(cells) + " |")
    print(f"\n(the other process takes {', '.join(f'{d / cores:.0%}' for d in DUTIES if d)} of the machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
