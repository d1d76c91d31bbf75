"""benchmarks/refusal.py runs on the tiny served models: a row per refusal path, and the paths' answers agree
(the script asserts that the bytes are the same 429)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_refusal_benchmark_times_both_paths(models_dir):
    cmd = [sys.executable, "benchmarks/refusal.py", "--models", str(models_dir), "--n", "50"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| at the wire") or
            line.startswith("| through h11")]  # fmt: skip
    assert len(rows) == 2, run.stdout
    assert "the same" in run.stdout and "(a 429)" in run.stdout
    for row in rows:
        assert float(row.split("|")[2]) > 0
