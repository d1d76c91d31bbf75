"""Quality against training time: `fewstep eval` on every snapshot of a run (``snapshot_minutes``) and its export.

    python benchmarks/curve.py --run runs/distill/dmd2-4step-g2 --steps 4 --n 1000 \\
        --reference docs/eval/digits-teacher-guidance/guidance-2/eval.json --out docs/eval/digits-dmd2-4step-g2-curve

Writes OUT/curve.md (a row per snapshot: minutes, optimizer steps, accuracies, FD and FD / the reference's) and
OUT/curve.png (FD against training minutes, the reference's FD as a line). Snapshots already measured (their row
in OUT/curve.json) are not measured again, so the command can follow a run that is still going.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def checkpoints(run: Path) -> list[Path]:
    snaps = sorted((run / "snapshots").glob("step-*")) if (run / "snapshots").is_dir() else []
    return [*snaps, *([run / "export"] if (run / "export" / "card.json").is_file() else [])]


def plot(rows: list[dict], reference: dict | None, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot([r["minutes"] for r in rows], [r["fd"] for r in rows], "o-", label="student")
    if reference is not None:
        ax.axhline(reference["fd"], color="gray", ls="--", label=f"reference ({reference['label']})")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("Fréchet distance (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    from fewstep.models.checkpoint import read_card
    from fewstep.models.pipeline import TextToImage
    from fewstep.paths import resolve_model
    from fewstep.training.classifier import load_classifier
    from fewstep.training.evaluate import evaluate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory with snapshots/ (and export/)")
    p.add_argument("--steps", type=int, required=True, help="sampling steps to measure at")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--reference", help="an eval.json (fewstep eval) whose FD is the line to reach")
    p.add_argument("--classifier", default=None, help="the judge (default: digits-classifier)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "curve.json"
    done = {r["key"]: r for r in json.loads(store.read_text())["rows"]} if store.exists() else {}
    reference = None
    if args.reference:
        ref = json.loads(Path(args.reference).read_text())
        row = next(r for r in ref["rows"])
        label = f"{ref['model']}, {row['steps']} steps, guidance {ref['guidance']:g}: FD {row['fd']:.1f}"
        reference = {"fd": row["fd"], "label": label}
    classifier = load_classifier(resolve_model(args.classifier, "digits-classifier"))
    rows, seen = [], set()
    for ckpt in checkpoints(run):
        card = read_card(ckpt)
        if card.files["transformer.safetensors"].sha256 in seen:  # the export is the last snapshot: one row
            continue
        seen.add(card.files["transformer.safetensors"].sha256)
        # a re-export or another step count is measured afresh
        key = f"{ckpt}|{args.steps}|{card.files['transformer.safetensors'].sha256}"
        if key not in done or done[key]["n"] != args.n:
            res = evaluate(TextToImage.load(ckpt), classifier, [args.steps], n=args.n)
            r = res["rows"][0]
            done[key] = {
                "key": key,
                "checkpoint": str(ckpt),
                "n": args.n,
                "minutes": card.training["duration_s"] / 60,
                "optimizer_steps": card.training["steps"],
                **{k: r[k] for k in ("digit_accuracy", "fg_accuracy", "bg_accuracy", "fd")},
            }
            store.write_text(json.dumps({"rows": list(done.values())}, indent=2))
        rows.append(done[key])
    rows.sort(key=lambda r: r["minutes"])
    lines = [
        f"# {run.name}: quality against training time ({args.steps} steps, n = {args.n})",
        "",
        f"Measured by `python benchmarks/curve.py --run {args.run} --steps {args.steps} --n {args.n}`"
        + (f" against {reference['label']}." if reference else "."),
        "",
        "| minutes | optimizer steps | digit acc | fg color acc | bg color acc | FD | FD / reference |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['fd'] / reference['fd']:.2f}×" if reference else "-"
        lines.append(
            f"| {r['minutes']:.1f} | {r['optimizer_steps']} | {100 * r['digit_accuracy']:.1f}% | "
            f"{100 * r['fg_accuracy']:.1f}% | {100 * r['bg_accuracy']:.1f}% | {r['fd']:.1f} | {ratio} |"
        )
    (out / "curve.md").write_text("\n".join(lines) + "\n\n![FD against training minutes](curve.png)\n")
    plot(rows, reference, f"{run.name}: FD at {args.steps} steps", out / "curve.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
