"""What the GIL costs a model batch on a CPU: the transformer eager against as frozen graphs (models/graphs.py).

Eager PyTorch takes the GIL back after every op, so another thread that runs Python (the server's event loop,
or a second device thread) can hold a batch up while its core waits. A frozen TorchScript graph runs every op
with the GIL released. This runs one single-threaded batch of the model both ways, alone and beside a thread
that runs Python without pause (the worst case: the GIL is handed back only when the switch interval forces it),
and then as the server runs a large batch on two cores: split into two single-threaded parts at once
(benchmarks/split.py's layout). Rounds alternate the two ways (a shared VM's speed drifts).

    python benchmarks/gil.py [--model zoo/digits-consistency] [--batch 16] [--rounds 3]

Prints a Markdown table: ms per batch (alone; beside a Python thread) and the split's images/s, each way.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch
from split import Layouts  # benchmarks/split.py, beside this script

PROMPT = "a red 7 on black"


class Busy:
    """A thread running Python bytecode without pause until stopped."""

    def __enter__(self) -> Busy:
        self.stop = False
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()
        return self

    def _spin(self) -> None:
        n = 0
        while not self.stop:
            n += 1

    def __exit__(self, *exc) -> None:
        self.stop = True
        self.thread.join()


def batch_ms(model, batch: int, repeat: int) -> float:
    prompts, seeds = [PROMPT] * batch, list(range(batch))
    model.generate(prompts, seeds, steps=1)  # warm: its graph, the allocator
    t0 = time.perf_counter()
    for _ in range(repeat):
        model.generate(prompts, seeds, steps=1)
    return 1000 * (time.perf_counter() - t0) / repeat


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="zoo/digits-consistency")
    p.add_argument("--batch", type=int, default=16, help="images per single-threaded batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=4, help="batches per measurement")
    p.add_argument("--seconds", type=float, default=1.5, help="per split measurement")
    args = p.parse_args()
    if args.rounds < 1 or args.batch < 1 or args.repeat < 1:
        p.error("--rounds, --batch and --repeat must be at least 1")
    from fewstep.models.pipeline import TextToImage

    threads = torch.get_num_threads()
    model = TextToImage.load(Path(args.model))
    layouts = Layouts(model, 2, threads)
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for way in ("eager", "graphs"):
                model.use_graphs(way == "graphs")
                torch.set_num_threads(1)
                results.setdefault((way, "alone"), []).append(batch_ms(model, args.batch, args.repeat))
                with Busy():
                    results.setdefault((way, "busy"), []).append(batch_ms(model, args.batch, args.repeat))
                torch.set_num_threads(threads)
                split = layouts.images_per_s("split", 2 * args.batch, args.seconds)
                results.setdefault((way, "split"), []).append(split)
    finally:
        layouts.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{Path(args.model).name}, 1 step, batches of {args.batch} on 1 thread; split: {2 * args.batch} images "
          f"as 2 single-threaded parts at once on {threads} threads; medians of {args.rounds} rounds\n")  # fmt: skip
    print("| transformer | ms per batch, alone | beside a thread running Python | split (images/s) |")
    print("|---|---:|---:|---:|")
    for way in ("eager", "graphs"):
        print(f"| {way} | {med[way, 'alone']:.1f} | {med[way, 'busy']:.1f} | {med[way, 'split']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
