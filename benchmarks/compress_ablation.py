"""The compression losses' ablation at equal training time: which terms recover the removed blocks' quality.

    python benchmarks/compress_ablation.py --minutes 5 --n 500 --out docs/eval/compress-ablation

Runs `fewstep compress --config configs/compress-digits.yaml` once per variant (the same blocks removed, the same
seed and data, `max_minutes` each), then `fewstep eval`'s benchmark on each export at the teacher's default steps,
and writes OUT/ablation.md (a row per variant, the full teacher's row first). A variant whose run already
exported is not trained again (delete its directory under --runs to redo it).

variants: task only; task + output KD; task + feature KD; task + output + feature KD (plain MSE, BK-SDM);
the same with per-block normalised feature KD (Flux-Mini's per-block scaling).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {  # name: (task, output_kd, feature_kd, feature_norm)
    "task": (1.0, 0.0, 0.0, "plain"),
    "task+out": (1.0, 1.0, 0.0, "plain"),
    "task+feat": (1.0, 0.0, 1.0, "plain"),
    "task+out+feat": (1.0, 1.0, 1.0, "plain"),
    "task+out+feat (per-block)": (1.0, 1.0, 1.0, "per_block"),
}


def slug(name: str) -> str:
    return name.replace(" ", "").replace("(", "-").replace(")", "").replace("+", "_")


def main() -> int:
    from fewstep.models.checkpoint import read_card
    from fewstep.models.pipeline import TextToImage
    from fewstep.paths import resolve_model
    from fewstep.training.classifier import load_classifier
    from fewstep.training.evaluate import evaluate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/compress-digits.yaml")
    p.add_argument("--minutes", type=float, default=5.0, help="training minutes per variant")
    p.add_argument("--n", type=int, default=500, help="images per evaluation")
    p.add_argument("--runs", default="runs/compress/ablation")
    p.add_argument("--teacher-eval", help="the teacher's eval.json at the same n (else it is measured)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "ablation.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    classifier = load_classifier(resolve_model(None, "digits-classifier"))
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:
        task, out_kd, feat, norm = VARIANTS[name]
        run = runs / slug(name)
        if not (run / "export" / "card.json").is_file():
            cmd = [
                sys.executable, "-m", "fewstep.cli", "compress", "--config", args.config, "--out", str(run),
                "--set", f"max_minutes={args.minutes}", "--set", f"compress.task_weight={task}",
                "--set", f"compress.output_weight={out_kd}", "--set", f"compress.feature_weight={feat}",
                "--set", f"compress.feature_norm={norm}", "--set", f"name=compress-{slug(name)}",
            ]  # fmt: skip
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        card = read_card(run / "export")
        key = f"{name}|{args.n}|{card.files['transformer.safetensors'].sha256}"
        if key not in results:
            model = TextToImage.load(run / "export")
            res = evaluate(model, classifier, [model.sampling.default_steps], n=args.n)
            results[key] = {"name": name, **res["rows"][0], "optimizer_steps": card.training["steps"]}
            store.write_text(json.dumps(results, indent=2))
    if args.teacher_eval:
        teacher = json.loads(Path(args.teacher_eval).read_text())
        if teacher["n"] != args.n:
            raise SystemExit(f"--teacher-eval has n = {teacher['n']}, not {args.n}")
        t_row = teacher["rows"][-1]
    else:  # measured once per n, then read back
        teacher_dir = Path(read_card(runs / slug(names[0]) / "export").training["settings"]["teacher"])
        key = f"teacher|{args.n}|{read_card(teacher_dir).files['transformer.safetensors'].sha256}"
        if key not in results:
            teacher_model = TextToImage.load(teacher_dir)
            steps = teacher_model.sampling.default_steps
            results[key] = evaluate(teacher_model, classifier, [steps], n=args.n)["rows"][0]
            store.write_text(json.dumps(results, indent=2))
        t_row = results[key]
    lines = [
        f"# Compression ablation: {args.minutes:g} training minutes per variant (n = {args.n})",
        "",
        f"Measured by `python benchmarks/compress_ablation.py --minutes {args.minutes:g} --n {args.n}` "
        f"({args.config}: the same blocks removed, the same seed).",
        "",
        "| variant | optimizer steps | digit acc | fg color acc | bg color acc | FD | FD / teacher |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| full teacher | - | {100 * t_row['digit_accuracy']:.1f}% | {100 * t_row['fg_accuracy']:.1f}% | "
        f"{100 * t_row['bg_accuracy']:.1f}% | {t_row['fd']:.1f} | 1.00× |",
    ]
    for name in names:
        card = read_card(runs / slug(name) / "export")
        r = results[f"{name}|{args.n}|{card.files['transformer.safetensors'].sha256}"]
        lines.append(
            f"| {name} | {card.training['steps']} | {100 * r['digit_accuracy']:.1f}% | {100 * r['fg_accuracy']:.1f}% | "
            f"{100 * r['bg_accuracy']:.1f}% | {r['fd']:.1f} | {r['fd'] / t_row['fd']:.2f}× |"
        )
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
