"""The colored-digits benchmark: generate from prompts with known answers and judge the images.

Metrics per step count: digit accuracy, foreground / background color accuracy (by the shipped
classifier), Fréchet distance between classifier features of generated and of real test images
(with the real-vs-real floor at the same n, since FD moves with n), and milliseconds per image.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.models.checkpoint import Card, EvalRow, Evaluation, read_card, update_card
from fewstep.models.images import grid
from fewstep.models.pipeline import TextToImage
from fewstep.training.classifier import DigitClassifier
from fewstep.training.data import TEMPLATES, caption, load_data, random_colors, render, to_unit


@dataclass(frozen=True)
class EvalPrompts:
    prompts: list[str]
    digits: torch.Tensor
    fg: torch.Tensor
    bg: torch.Tensor
    seeds: list[int]


def eval_prompts(n: int, seed: int = 0) -> EvalPrompts:
    """n prompts over every phrasing, numerals and words alike; the same n always gives the same set."""
    g = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, 10, (n,), generator=g)
    fg, bg = random_colors(n, g)
    prompts = [
        caption(int(d), int(f), int(b), i % len(TEMPLATES), bool((i // len(TEMPLATES)) % 2))
        for i, (d, f, b) in enumerate(zip(digits, fg, bg, strict=True))
    ]
    return EvalPrompts(prompts, digits, fg, bg, seeds=[seed * 100_000 + i for i in range(n)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½), in float64 via symmetric eigendecompositions."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@torch.no_grad()
def real_features(classifier: DigitClassifier, n: int, seed: int, data: str = "digits") -> torch.Tensor:
    test = load_data(data, "test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(test), generator=g)[:n]
    fg, bg = random_colors(len(idx), g)
    images = to_unit(render(test.images[idx].float() / 255.0, fg, bg))
    return torch.cat([classifier.features(chunk) for chunk in images.split(500)])


@torch.no_grad()
def evaluate(
    model: TextToImage,
    classifier: DigitClassifier,
    steps_list: list[int],
    n: int = 1000,
    batch_size: int = 100,
    guidance: float | None = None,
    data: str = "digits",
    progress: bool = True,
) -> dict:
    """Runs the benchmark; returns {"model", "n", "real_floor_fd", "rows": [...]}."""
    ep = eval_prompts(n)
    real_a = real_features(classifier, n, seed=1, data=data)
    real_b = real_features(classifier, n, seed=2, data=data)
    floor = frechet_distance(real_a, real_b)
    rows = []
    for steps in steps_list:
        images, seconds = [], 0.0
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            t0 = time.perf_counter()
            images.append(model.generate(ep.prompts[lo:hi], ep.seeds[lo:hi], steps=steps, guidance=guidance).cpu())
            seconds += time.perf_counter() - t0
            if progress:
                print(f"\r{model.name}: {steps} steps, {hi}/{n} images", end="", flush=True)
        if progress:
            print()
        gen = torch.cat(images)
        out = {k: [] for k in ("digit", "fg", "bg", "features")}
        for chunk in gen.split(500):
            for k, v in classifier(chunk).items():
                out[k].append(v)
        out = {k: torch.cat(v) for k, v in out.items()}
        rows.append(
            {
                "steps": steps,
                "digit_accuracy": float((out["digit"].argmax(-1) == ep.digits).float().mean()),
                "fg_accuracy": float((out["fg"].argmax(-1) == ep.fg).float().mean()),
                "bg_accuracy": float((out["bg"].argmax(-1) == ep.bg).float().mean()),
                "fd": frechet_distance(out["features"], real_a),
                "ms_per_image": 1000 * seconds / n,
            }
        )
    return {
        "model": model.name,
        "role": model.card.role if model.card else None,
        "n": n,
        "data": data,
        "guidance": model.sampling.guidance if guidance is None else guidance,
        "real_floor_fd": floor,
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def sample_grid(model: TextToImage, steps: int, guidance: float | None = None, n: int = 40, nrow: int = 10):
    """The benchmark's sample grid: the first ``n`` evaluation prompts with their seeds, ``nrow`` per row."""
    ep = eval_prompts(n)
    return grid(model.generate(ep.prompts, ep.seeds, steps=steps, guidance=guidance), nrow=nrow)


def markdown_table(results: list[dict]) -> str:
    """One table over several evaluations (models × step counts)."""
    lines = [
        "| model | steps | digit acc | fg color acc | bg color acc | Fréchet dist. (real floor) | ms / image |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for r in res["rows"]:
            lines.append(
                f"| {res['model']} | {r['steps']} | {100 * r['digit_accuracy']:.1f}% | {100 * r['fg_accuracy']:.1f}% "
                f"| {100 * r['bg_accuracy']:.1f}% | {r['fd']:.2f} ({res['real_floor_fd']:.2f}) "
                f"| {r['ms_per_image']:.2f} |"
            )
    n = {res["n"] for res in results}
    lines.append("")
    lines.append(
        f"n = {', '.join(map(str, sorted(n)))} images per row; CPU threads: {results[0]['threads']}; "
        f"device: {results[0]['device']}."
    )
    return "\n".join(lines) + "\n"


def write_results(
    results: dict, out: Path, model: TextToImage | None = None, guidance: float | None = None
) -> tuple[Path, Path]:
    """eval.json and eval.md in ``out``; with ``model``, a samples_{steps}steps.png grid per evaluated row."""
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "eval.json", out / "eval.md"
    j.write_text(json.dumps(results, indent=2) + "\n")
    m.write_text(f"# Evaluation of {results['model']}\n\n" + markdown_table([results]))
    if model is not None:
        for row in results["rows"]:
            sample_grid(model, row["steps"], guidance).save(out / f"samples_{row['steps']}steps.png")
    return j, m


def choose_guidance(sweep: list[dict], min_accuracy: float) -> dict:
    """The evaluation whose first row (the first step count evaluated) has the lowest FD among those whose digit
    and color accuracies all reach ``min_accuracy``; if none does, the most accurate. Guidance buys accuracy
    with diversity: past the accuracy it needs, a larger scale only narrows the distribution (higher FD)."""

    def accuracy(res: dict) -> float:
        r = res["rows"][0]
        return min(r["digit_accuracy"], r["fg_accuracy"], r["bg_accuracy"])

    passing = [res for res in sweep if accuracy(res) >= min_accuracy]
    if passing:
        return min(passing, key=lambda res: (res["rows"][0]["fd"], res["guidance"]))
    return max(sweep, key=lambda res: (accuracy(res), -res["rows"][0]["fd"]))


def sweep_table(sweep: list[dict], chosen: dict | None = None) -> str:
    lines = [
        "| guidance | steps | digit acc | fg color acc | bg color acc | Fréchet dist. (real floor) | |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for res in sweep:
        r = res["rows"][0]
        mark = "chosen" if res is chosen else ""
        lines.append(
            f"| {res['guidance']:g} | {r['steps']} | {100 * r['digit_accuracy']:.1f}% | {100 * r['fg_accuracy']:.1f}% "
            f"| {100 * r['bg_accuracy']:.1f}% | {r['fd']:.2f} ({res['real_floor_fd']:.2f}) | {mark} |"
        )
    return "\n".join(lines) + "\n"


def record_in_card(
    directory: str | Path,
    results: dict,
    model: TextToImage,
    judge: Path,
    min_accuracy: float,
    command: str,
    sweep: list[dict] | None = None,
    guidance_min_accuracy: float | None = None,
) -> Card:
    """Write ``results`` into the model's card as its typed ``evaluation`` (``fewstep eval --write-card``).

    A student serves the measured step counts whose digit, foreground and background accuracies all reach
    ``min_accuracy``; the grid each measured count used is recorded in its sampling section, so the card says
    exactly how a served count is sampled. Routing reads this section (server/routing.py), nothing else.
    A text-to-image card's free-form ``metrics`` are cleared: its measurements live here now. With a guidance
    ``sweep`` (``results`` is the chosen scale's evaluation: choose_guidance), every scale is recorded and the
    chosen one becomes the model's default guidance (``sampling.guidance``).
    """
    card = model.card
    judge_card = read_card(judge)
    [judge_file] = [f for f in judge_card.files if f.endswith(".safetensors")]
    rows = [EvalRow(**{k: r[k] for k in EvalRow.model_fields}) for r in results["rows"]]
    evaluation = {
        "n": results["n"],
        "guidance": results["guidance"],
        "real_floor_fd": results["real_floor_fd"],
        "judge": {"name": judge_card.name, "sha256": judge_card.files[judge_file].sha256},
        "data": results.get("data", "digits"),
        "device": results["device"],
        "rows": rows,
        "command": command,
    }
    changes: dict = {"metrics": {}}
    if card.role == "student":
        ok = [r.steps for r in rows if min(r.digit_accuracy, r.fg_accuracy, r.bg_accuracy) >= min_accuracy]
        evaluation.update(min_accuracy=min_accuracy, serves_steps=sorted(ok))
        timesteps = {**card.sampling.timesteps, **{str(r.steps): model.grid(r.steps) for r in rows}}
        steps = sorted(int(k) for k in timesteps)
        changes["sampling"] = card.sampling.model_copy(update={"timesteps": timesteps, "max_steps": max(steps)})
    if sweep:
        evaluation["guidance_sweep"] = [{"guidance": res["guidance"], **{k: res["rows"][0][k] for k in
                                        ("steps", "digit_accuracy", "fg_accuracy", "bg_accuracy", "fd")}}
                                        for res in sweep]  # fmt: skip
        evaluation["guidance_min_accuracy"] = guidance_min_accuracy
        sampling = changes.get("sampling", card.sampling)
        changes["sampling"] = sampling.model_copy(update={"guidance": results["guidance"]})
    changes["evaluation"] = Evaluation.model_validate(evaluation)
    return update_card(directory, **changes)
