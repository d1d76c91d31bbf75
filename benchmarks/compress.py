"""Forward speed of compressed transformers against their source: ms per forward at batch 1 and 32.

    python benchmarks/compress.py --models zoo/digits-teacher runs/compress/export [--out docs/compress-speed.md]

Every model's transformer runs the same inputs (a text batch, latents at t = 0.5); measurements alternate between
the models, round after round, and the median of the rounds is reported, so that a noisy machine slows every model
alike. The first model is the reference of the speed-up column. Ratios are the figures to compare on a CPU;
absolute milliseconds mean something only on the GPU a model is served on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _inputs(model, batch: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.latent_shape, generator=g)
    t = torch.full((batch,), 0.5)
    cond = model.encode_text(["a red 7 on black"] * batch)
    # a guidance-embedded model (a consistency or guidance-distilled student) takes its scale as an input
    w = torch.full((batch,), model.sampling.guidance) if model.transformer.guidance_in is not None else None
    return x, t, cond, w


@torch.inference_mode()
def measure(models: dict[str, object], batches: list[int], rounds: int, repeats: int) -> dict[tuple[str, int], float]:
    """-> median ms per forward, per (model, batch)."""
    times: dict[tuple[str, int], list[float]] = {(m, b): [] for m in models for b in batches}
    inputs = {(m, b): _inputs(models[m], b) for m in models for b in batches}
    for name, model in models.items():  # warm up every shape once
        for b in batches:
            x, t, c, w = inputs[(name, b)]
            model.transformer(x, t, c.tokens, c.mask, c.pooled, guidance=w)
    for _ in range(rounds):
        for b in batches:
            for name, model in models.items():
                x, t, c, w = inputs[(name, b)]
                t0 = time.perf_counter()
                for _ in range(repeats):
                    model.transformer(x, t, c.tokens, c.mask, c.pooled, guidance=w)
                times[(name, b)].append(1000 * (time.perf_counter() - t0) / repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    from fewstep.models.checkpoint import read_card
    from fewstep.models.pipeline import TextToImage

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="checkpoint directories; the first is the reference")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=5, help="forwards per timed measurement")
    p.add_argument("--out", help="write the table (Markdown) here too")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cards = {c.name: c for c in map(read_card, args.models)}  # named as their cards name them
    if len(cards) != len(args.models):
        raise SystemExit("two of --models have the same name in their cards")
    models = {name: TextToImage.load(d) for name, d in zip(cards, args.models, strict=True)}
    ms = measure(models, batches, args.rounds, args.repeats)
    ref = next(iter(models))
    head = "| model | blocks (double + single) | " + " | ".join(f"ms, batch {b} | speed-up" for b in batches) + " |"
    lines = [head, "|---|---|" + "---:|---:|" * len(batches)]
    for name, model in models.items():
        tr = model.transformer
        depth = f"{len(tr.double_blocks)} + {len(tr.single_blocks)}"
        cells = " | ".join(f"{ms[(name, b)]:.2f} | {ms[(ref, b)] / ms[(name, b)]:.2f}×" for b in batches)
        lines.append(f"| {name} | {depth} | {cells} |")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    text = (
        f"Transformer forward, median of {args.rounds} alternating rounds of {args.repeats} forwards "
        f"({machine}):\n\n" + "\n".join(lines) + "\n"
    )
    for name, card in cards.items():
        if card.compression is not None:
            c = card.compression
            text += f"\n- {name}: kept {', '.join(c.kept)}; removed {', '.join(c.removed)} ({c.criterion})"
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
