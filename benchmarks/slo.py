"""SLO-aware step count under a load ramp: fixed ``steps: 4`` against ``steps: "auto"`` with a latency target.

    python benchmarks/slo.py --models zoo --slo-ms 300 --out docs/performance.md

One `fewstep serve` subprocess (benchmarks/serve.py's Server). For each load level (1 to 64 closed-loop
clients) and each mode, the clients send the colored-digits benchmark's prompts and seeds (training/evaluate.py,
so every image's right digit and colors are known); the table gives the share of requests answered within the
target, throughput, and the steps served. The served images of each mode, pooled over the ramp, are judged by
the project's classifier (zoo/digits-classifier): digit and color accuracy and Fréchet distance to real test
images (the same judge and features as `fewstep eval`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import sys
import time
from collections import Counter

import httpx
import numpy as np
import torch
from PIL import Image
from report import publish_section
from serve import NODELAY, Server, percentile

from fewstep.paths import resolve_model
from fewstep.training.classifier import load_classifier
from fewstep.training.data import to_unit
from fewstep.training.evaluate import eval_prompts, frechet_distance, real_features

LEVELS = (1, 2, 4, 8, 16, 32, 64)


async def _level(url: str, clients: int, requests: int, mode: dict, ep, offset: int, slo_ms: float) -> dict:
    """``requests`` requests from ``clients`` closed-loop clients -> latencies, steps, images and answers."""
    out = {"ms": [], "steps": [], "images": [], "index": []}
    next_i = [0]
    transport = httpx.AsyncHTTPTransport(socket_options=NODELAY)
    async with httpx.AsyncClient(base_url=url, timeout=300, transport=transport) as c:

        async def worker() -> None:
            while next_i[0] < requests:
                i = offset + next_i[0]
                next_i[0] += 1
                body = {"prompt": ep.prompts[i], "seed": ep.seeds[i], **mode}
                t0 = time.perf_counter()
                r = await c.post("/v1/generate", json=body)
                ms = 1000 * (time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
                j = r.json()
                out["ms"].append(ms)
                out["steps"].append(f"{j['served_by']}@{j['steps']}")
                out["images"].append(j["images"][0]["b64"])
                out["index"].append(i)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        out["seconds"] = time.perf_counter() - t0
    out["within"] = sum(ms <= slo_ms for ms in out["ms"]) / len(out["ms"])
    return out


@torch.no_grad()
def judge(classifier, images_b64: list[str], index: list[int], ep, real: torch.Tensor) -> dict:
    pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in images_b64]
    x = to_unit(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float())
    out = {k: [] for k in ("digit", "fg", "bg", "features")}
    for chunk in x.split(500):
        for k, v in classifier(chunk).items():
            out[k].append(v)
    out = {k: torch.cat(v) for k, v in out.items()}
    idx = torch.tensor(index)
    return {
        "digit": float((out["digit"].argmax(-1) == ep.digits[idx]).float().mean()),
        "fg": float((out["fg"].argmax(-1) == ep.fg[idx]).float().mean()),
        "bg": float((out["bg"].argmax(-1) == ep.bg[idx]).float().mean()),
        "fd": frechet_distance(out["features"], real),
        "n": len(index),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="zoo")
    p.add_argument("--slo-ms", type=float, default=300.0, help="the latency target (auto's latency_slo_ms)")
    p.add_argument("--requests", type=int, default=128, help="requests per load level and mode")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="client counts of the ramp")
    p.add_argument("--classifier", default="digits-classifier", help="the judge: a directory or a zoo name")
    p.add_argument("--out", default="docs/performance.md")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    modes = {"steps 4": {"steps": 4}, "auto": {"steps": "auto", "latency_slo_ms": args.slo_ms}}
    ep = eval_prompts(len(levels) * args.requests)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with Server(args.models, max_batch=8, queue_size=512, max_queued_work_s=600) as server:
        for li, clients in enumerate(levels):
            for name, mode in modes.items():
                res = asyncio.run(_level(server.url, clients, args.requests, mode, ep, li * args.requests, args.slo_ms))
                results[name].append(res)
                rate = len(res["ms"]) / res["seconds"]
                within = f"{res['within']:.0%} within {args.slo_ms:g} ms"
                print(f"{name:8s} {clients:3d} clients: {within}, {rate:.1f} images/s, {dict(Counter(res['steps']))}")
    classifier = load_classifier(resolve_model(args.classifier, "digits-classifier"))
    real = real_features(classifier, 1000, seed=1)
    lines = [
        "| clients | mode | within target | p50 ms | p99 ms | images/s | served (model@steps: requests) |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for li, clients in enumerate(levels):
        for name in modes:
            r = results[name][li]
            served = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(r["steps"]).items()))
            lines.append(
                f"| {clients} | {name} | {r['within']:.0%} | {percentile(r['ms'], 50):.0f} | "
                f"{percentile(r['ms'], 99):.0f} | {len(r['ms']) / r['seconds']:.1f} | {served} |"
            )
    lines += ["", "| mode | within target (all requests) | digit acc | fg acc | bg acc | FD | images judged |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in modes:
        rs = results[name]
        ms = [x for r in rs for x in r["ms"]]
        q = judge(classifier, [x for r in rs for x in r["images"]], [x for r in rs for x in r["index"]], ep, real)
        lines.append(
            f"| {name} | {sum(x <= args.slo_ms for x in ms) / len(ms):.0%} | {100 * q['digit']:.1f}% | "
            f"{100 * q['fg']:.1f}% | {100 * q['bg']:.1f}% | {q['fd']:.1f} | {q['n']} |"
        )
    lines += ["", f"Target {args.slo_ms:g} ms; {args.requests} requests per level and mode (n = 1), max_batch 8; "
              f"`python benchmarks/slo.py --models {args.models} --slo-ms {args.slo_ms:g}`. FD: the classifier's "
              "features of the served images against 1000 real test images (`fewstep eval`'s measure; it moves "
              "with n, so compare the two rows, not with eval tables at n = 1000)."]  # fmt: skip
    return publish_section(args.out, "SLO-aware steps", lines)


if __name__ == "__main__":
    sys.exit(main())
