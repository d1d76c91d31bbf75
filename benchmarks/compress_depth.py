"""Depth against quality and speed: the teacher compressed to every depth with the same optimizer steps.

    python benchmarks/compress_depth.py --remove 1,2,3,4 --steps 600 --n 500 --out docs/eval/compress-depth

Runs `fewstep compress --config configs/compress-digits.yaml --remove K` once per K (the K least important blocks by
the config's criterion, the same seed, data, losses and number of optimizer steps — not minutes, so that a busy
machine slows a run without changing its result), evaluates every export and the full
teacher with `fewstep eval`'s benchmark at the teacher's default steps, times each transformer's forward at batch 1
and 32 (benchmarks/compress.py: alternating rounds, medians), and writes OUT/depth.md and OUT/depth.png (FD and
ms / forward against the blocks kept). A depth whose run already exported is not trained again, and a measured
evaluation (OUT/depth.json, keyed by the weights' sha256) is not repeated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compress import measure  # noqa: E402  (benchmarks/compress.py: one timing method for both tables)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [r["blocks"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(blocks, [r["fd"] for r in rows], "o-", color="C0", label="FD")
    for r in rows:  # FD alone reads as "fewer blocks, better": the digit accuracy says what it costs
        ax.annotate(f"{100 * r['digit_accuracy']:.1f}% digits", (r["blocks"], r["fd"]), textcoords="offset points",
                    xytext=(4, 6), fontsize=7, color="C0")  # fmt: skip
    ax.set_xticks(blocks)
    ax.set_xlabel("transformer blocks kept (double + single)")
    ax.set_ylabel("Fréchet distance (lower is better)", color="C0")
    ax.invert_xaxis()  # left to right: more blocks removed
    right = ax.twinx()
    right.plot(blocks, [r["ms_b32"] for r in rows], "s--", color="C1", label="ms / forward, batch 32")
    right.set_ylabel("ms / forward at batch 32", color="C1")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    from fewstep.models.checkpoint import read_card
    from fewstep.models.pipeline import TextToImage
    from fewstep.paths import resolve_model
    from fewstep.training.classifier import load_classifier
    from fewstep.training.evaluate import evaluate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/compress-digits.yaml")
    p.add_argument("--remove", default="1,2,3,4", help="comma-separated block counts to remove")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per depth")
    p.add_argument("--n", type=int, default=500, help="images per evaluation")
    p.add_argument("--rounds", type=int, default=9, help="timing rounds (benchmarks/compress.py)")
    p.add_argument("--runs", default="runs/compress/depth")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "depth.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    classifier = load_classifier(resolve_model(None, "digits-classifier"))
    exports: dict[int, Path] = {}
    for k in (int(x) for x in args.remove.split(",") if x.strip()):
        run = runs / f"remove-{k}"
        if not (run / "export" / "card.json").is_file():
            cmd = [
                sys.executable, "-m", "fewstep.cli", "compress", "--config", args.config, "--out", str(run),
                "--remove", str(k), "--set", f"max_steps={args.steps}", "--set", "max_minutes=0",
                "--set", f"name=compress-remove-{k}",
            ]  # fmt: skip
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        exports[k] = run / "export"
    teacher_dir = Path(read_card(next(iter(exports.values()))).training["settings"]["teacher"])
    dirs = {0: teacher_dir, **exports}
    models = {k: TextToImage.load(d) for k, d in dirs.items()}
    rows = []
    for k, model in models.items():
        key = f"{k}|{args.n}|{model.weights_sha256()}"
        if key not in results:
            res = evaluate(model, classifier, [model.sampling.default_steps], n=args.n)
            results[key] = res["rows"][0]
            store.write_text(json.dumps(results, indent=2))
        tr = model.transformer
        card = read_card(dirs[k])
        rows.append({
            **results[key], "removed": k, "blocks": len(tr.double_blocks) + len(tr.single_blocks),
            "depth": f"{len(tr.double_blocks)} + {len(tr.single_blocks)}",
            "kept": ", ".join(card.compression.kept) if card.compression else "all",
            "steps": card.training["steps"] if card.compression else None,  # optimizer steps, not sampling steps
        })  # fmt: skip
    ms = measure({str(k): m for k, m in models.items()}, [1, 32], args.rounds, repeats=5)
    for r in rows:
        r["ms_b1"], r["ms_b32"] = ms[(str(r["removed"]), 1)], ms[(str(r["removed"]), 32)]
    t = rows[0]
    lines = [
        f"# Depth against quality and speed: {args.steps} optimizer steps per depth (n = {args.n})",
        "",
        f"Measured by `python benchmarks/compress_depth.py --remove {args.remove} --steps {args.steps} "
        f"--n {args.n}` ({args.config}: the least important blocks by its criterion, the same seed and losses). "
        "Forward times: medians of alternating rounds on this machine; compare the ratios.",
        "",
        "| blocks removed | depth (double + single) | kept | optimizer steps | digit acc | fg acc | bg acc | FD "
        "| FD / teacher | ms, batch 1 | ms, batch 32 | speed-up, batch 32 |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['removed']} | {r['depth']} | {r['kept']} | {r['steps'] if r['steps'] is not None else '-'} | "
            f"{100 * r['digit_accuracy']:.1f}% | {100 * r['fg_accuracy']:.1f}% | {100 * r['bg_accuracy']:.1f}% | "
            f"{r['fd']:.1f} | {r['fd'] / t['fd']:.2f}× | {r['ms_b1']:.2f} | {r['ms_b32']:.2f} | "
            f"{t['ms_b32'] / r['ms_b32']:.2f}× |"
        )
    lines += ["", "![depth against FD and ms / forward](depth.png)"]
    plot(rows, out / "depth.png", f"digits teacher compressed, {args.steps} steps per depth, n = {args.n}")
    (out / "depth.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
