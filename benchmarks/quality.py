"""Quality table for docs/results.md: `fewstep eval` of several models at several step counts, in one run.

    python benchmarks/quality.py --model zoo/digits-teacher:40,1,2,4 --model runs/distill/x/export:1,2,4 \
        --reference digits-teacher:40 --n 1000 --out docs/results.md --grids docs/img

Each row: the CFG scale it was sampled at (each model's card default), digit and color accuracy, Fréchet
distance (with the real-vs-real floor at the same n) and, with ``--reference``, its ratio to the reference
row's (a teacher at its default steps and chosen guidance), ms per image on this machine, and the model's
training time from its card. One PNG grid per model and step count.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from fewstep.models.checkpoint import read_card
from fewstep.models.pipeline import TextToImage
from fewstep.training.classifier import load_classifier
from fewstep.training.evaluate import evaluate, sample_grid


def training_minutes(model: TextToImage) -> str:
    t = model.card.training if model.card else {}
    secs = t.get("duration_s")
    return f"{secs / 60:.0f} min" if secs else "—"


def check_reference(spec: str, planned: list[tuple[str, int]]) -> None:
    """Before anything is evaluated: ``MODEL_NAME:STEPS`` must name one of this table's rows."""
    name, _, steps = spec.rpartition(":")
    if (name, int(steps) if steps.isdigit() else None) not in planned:
        have = ", ".join(f"{n}:{s}" for n, s in planned)
        raise SystemExit(f"--reference {spec}: no such row in this table (rows: {have})")


def reference_fd(rows: list, spec: str) -> float:
    """The FD of the row ``MODEL_NAME:STEPS`` (``check_reference`` made sure the table has it)."""
    name, _, steps = spec.rpartition(":")
    return next(r["fd"] for model, _, r, _ in rows if model.name == name and r["steps"] == int(steps))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="DIR:STEPS,STEPS,... (evaluated now)")
    p.add_argument(
        "--precomputed",
        action="append",
        default=[],
        help="DIR=EVAL_DIR: rows from an earlier `fewstep eval --out EVAL_DIR` of the model in DIR "
        "(its eval.json and samples_*steps.png), measured with the same n",
    )
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--grids", default="docs/img")
    p.add_argument("--classifier", default="zoo/digits-classifier")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--reference", help="MODEL_NAME:STEPS, a row of this table: adds an FD / reference column")
    p.add_argument("--notes", help="a Markdown file placed between the table and the samples (what the rows mean)")
    args = p.parse_args()
    if args.reference:
        planned = [(read_card(path).name, int(s)) for path, _, steps in (m.rpartition(":") for m in args.model)
                   for s in steps.split(",")]  # fmt: skip
        for spec in args.precomputed:
            path, _, eval_dir = spec.partition("=")
            rows = json.loads((Path(eval_dir) / "eval.json").read_text())["rows"]
            planned += [(read_card(path).name, r["steps"]) for r in rows]
        check_reference(args.reference, planned)
    classifier = load_classifier(args.classifier)
    grids = Path(args.grids)
    grids.mkdir(parents=True, exist_ok=True)
    rows, raw = [], []
    for spec in args.precomputed:
        path, _, eval_dir = spec.partition("=")
        model = TextToImage.load(path)
        res = json.loads((Path(eval_dir) / "eval.json").read_text())
        if res["n"] != args.n:
            raise SystemExit(f"{eval_dir}: measured at n = {res['n']}, this table uses n = {args.n}")
        raw.append(res)
        for r in res["rows"]:
            img = grids / f"{model.name}-{r['steps']}steps.png"
            shutil.copyfile(Path(eval_dir) / f"samples_{r['steps']}steps.png", img)
            rows.append((model, res, r, img))
    for spec in args.model:
        path, _, steps_s = spec.rpartition(":")
        model = TextToImage.load(path)
        steps = [int(s) for s in steps_s.split(",")]
        res = evaluate(model, classifier, steps, n=args.n)
        raw.append(res)
        for r in res["rows"]:
            img = grids / f"{model.name}-{r['steps']}steps.png"
            sample_grid(model, r["steps"]).save(img)
            rows.append((model, res, r, img))
    ref_fd = reference_fd(rows, args.reference) if args.reference else None
    ratio_head, ratio_rule = (f" FD / {args.reference} |", "---:|") if ref_fd is not None else ("", "")
    lines = [
        f"| model | method | guidance | steps | digit acc | fg acc | bg acc | FD (real floor) |{ratio_head} ms / image "
        "| training |",
        f"|---|---|---:|---:|---:|---:|---:|---:|{ratio_rule}---:|---:|",
    ]
    for model, res, r, _ in rows:
        method = model.card.training.get("method", "?") if model.card else "?"
        ratio = f" {r['fd'] / ref_fd:.2f}× |" if ref_fd is not None else ""
        lines.append(
            f"| {model.name} | {method} | {res.get('guidance', '?')} | {r['steps']} | "
            f"{100 * r['digit_accuracy']:.1f}% | {100 * r['fg_accuracy']:.1f}% | {100 * r['bg_accuracy']:.1f}% | "
            f"{r['fd']:.2f} "
            f"({res['real_floor_fd']:.2f}) |{ratio} {r['ms_per_image']:.2f} | {training_minutes(model)} |"
        )
    out = Path(args.out)
    rel = Path("img") if out.parent == grids.parent else grids
    samples = "\n".join(
        f"**{m.name}, {r['steps']} steps** (prompts: the first 40 evaluation prompts)\n\n"
        f"![{m.name} {r['steps']} steps]({rel / img.name})\n"
        for m, _, r, img in rows
    )
    threads = torch.get_num_threads()
    out.write_text(
        "# Results\n\n"
        f"`python benchmarks/quality.py {' '.join(sys.argv[1:])}` "
        f"on a CPU with {threads} threads; n = {args.n} images per row, judged by `zoo/digits-classifier`. "
        "FD: Fréchet distance between the classifier's features of generated and of real test images; the "
        "real floor is the same distance between two disjoint real sets of the same size.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + (Path(args.notes).read_text().strip() + "\n\n" if args.notes else "")
        + "## Samples\n\n"
        + samples
    )
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
