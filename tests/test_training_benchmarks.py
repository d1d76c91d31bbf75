"""benchmarks/curve.py (quality against training time from a run's snapshots) and benchmarks/compress.py (forward
speed of a compressed transformer against its source), run on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fewstep.models.checkpoint import read_card
from fewstep.training.distill.methods import distill
from tests.helpers import tiny_distill

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def test_curve_measures_every_snapshot_once(tiny_teacher, tiny_classifier, tmp_path):
    run = tmp_path / "run"
    distill(tiny_distill(run, tiny_teacher, method="dmd2", max_steps=2, snapshot_minutes=1e-9))
    out = tmp_path / "curve"
    args = ["benchmarks/curve.py", "--run", str(run), "--steps", "1", "--n", "8", "--classifier", str(tiny_classifier)]
    bench(*args, "--out", str(out))
    rows = json.loads((out / "curve.json").read_text())["rows"]
    # the export holds the same EMA as the last snapshot (both after step 2): measured and listed once
    assert [Path(r["checkpoint"]).name for r in rows] == ["step-000001", "step-000002"]
    assert all(r["n"] == 8 and r["fd"] >= 0 for r in rows)
    table = (out / "curve.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and (out / "curve.png").stat().st_size > 1000
    mtime = (out / "curve.json").stat().st_mtime_ns
    bench(*args, "--out", str(out))  # nothing new: nothing measured again
    assert (out / "curve.json").stat().st_mtime_ns == mtime


def test_compress_benchmark_compares_forward_speed(tiny_teacher, tmp_path):
    out = tmp_path / "small"
    distill(tiny_distill(out, tiny_teacher, method="compress", compress={"remove": 1, "calibration": 4}))
    assert read_card(out / "export").compression.removed
    r = bench(
        "benchmarks/compress.py", "--models", str(tiny_teacher), str(out / "export"), "--rounds", "2", "--repeats", "1",
        "--out", str(tmp_path / "speed.md"),
    )  # fmt: skip
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and "blocks" not in ln]
    assert len(rows) == 2 and "| 1 + 1 |" in rows[0] and "1.00×" in rows[0]
    assert "removed" in (tmp_path / "speed.md").read_text()


def test_quality_table_states_guidance_and_the_fd_ratio_to_its_reference(tiny_teacher, tiny_classifier, tmp_path):
    out, raw = tmp_path / "results.md", tmp_path / "raw.json"
    card = read_card(tiny_teacher)
    args = ["benchmarks/quality.py", "--model", f"{tiny_teacher}:4,1", "--n", "8", "--classifier", str(tiny_classifier)]
    grids = ["--grids", str(tmp_path / "img")]
    bench(*args, *grids, "--reference", f"{card.name}:4", "--out", str(out), "--json", str(raw))
    rows = json.loads(raw.read_text())[0]["rows"]
    table = [ln.split(" | ") for ln in out.read_text().splitlines() if ln.startswith(f"| {card.name} |")]
    g = str(card.sampling.guidance)
    assert [(r[2], r[3]) for r in table] == [(g, "4"), (g, "1")]
    assert [r[8] for r in table] == ["1.00×", f"{rows[1]['fd'] / rows[0]['fd']:.2f}×"]
    r = subprocess.run([sys.executable, *args, *grids, "--reference", f"{card.name}:40", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode != 0 and f"--reference {card.name}:40: no such row" in r.stderr
    assert "images" not in r.stdout  # refused before any model was evaluated (a typo costs no minutes)
