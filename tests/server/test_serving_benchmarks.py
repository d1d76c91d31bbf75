"""The serving benchmarks run on the tiny served models: refusal.py (a row per refusal path; the paths' answers
agree: the script asserts the same 429 bytes), png.py (a row per zlib level), batch_gap.py, interference.py, gil.py,
split.py and serve.py."""

from __future__ import annotations

import re
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


def test_png_benchmark_times_every_level(models_dir):
    """benchmarks/png.py: a row per zlib level (the script checks every level decodes to the same pixels)."""
    cmd = [sys.executable, "benchmarks/png.py", "--model", str(models_dir / "tiny-student"), "--images", "2",
           "--repeat", "1"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line.split("|") for line in run.stdout.splitlines() if line[:2] == "| " and line[2].isdigit()]
    assert [int(r[1]) for r in rows] == list(range(10))
    assert float(rows[6][4].strip(" ×")) == 1.0  # the reference level


def test_batch_gap_benchmark_times_the_gap_between_batches(models_dir):
    """benchmarks/batch_gap.py: hooks inside a real `fewstep serve` child, 32 lockstep clients, one row per event
    (each after the device's end of a batch, the next batch's start after the last job is queued), then the
    batch's length and its fastest and slowest model call."""
    # a fill wait long enough that the tiny model's batches are all 32, as the zoo's are at 5 ms
    cmd = [sys.executable, "benchmarks/batch_gap.py", "--models", str(models_dir), "--model", "tiny-student",
           "--rounds", "4", "--max-wait-ms", "100"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| event")}  # fmt: skip
    assert len(rows) == 8, run.stdout
    assert rows["next batch starts (the gap)"] >= rows["last job queued"] >= rows["first request's headers in"] > 0
    # the model calls run inside the batch the event loop sees (medians of per-batch values: a little slack)
    assert 0 < rows["its fastest part (model call)"] <= rows["its slowest part"] <= 1.05 * rows["the batch itself"]


def test_interference_benchmark_runs_both_layouts_alone_and_beside_a_busy_core(models_dir):
    """benchmarks/interference.py: a row per layout (one batch over every thread; one single-threaded batch per
    thread), each alone and beside another process that keeps a core busy."""
    cmd = [sys.executable, "benchmarks/interference.py", "--model", str(models_dir / "tiny-student"), "--batch", "2",
           "--rounds", "1", "--seconds", "0.3"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "layout" not in line]
    assert len(rows) == 2, run.stdout
    assert rows[0][0].strip().startswith("one batch over") and rows[1][0].strip().endswith("batches of 1 thread")
    assert all(float(r[1]) > 0 and len(r) == 4 for r in rows), run.stdout


def test_split_benchmark_measures_both_layouts_for_every_batch_size(models_dir):
    """benchmarks/split.py: a row per batch size with one team's images/s, the split's and their ratio."""
    cmd = [sys.executable, "benchmarks/split.py", "--model", str(models_dir / "tiny-student"), "--batches", "2", "4",
           "--rounds", "1", "--seconds", "0.2"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "batch" not in line]
    assert [int(r[0]) for r in rows] == [2, 4], run.stdout
    for _, team, split, ratio in rows:
        assert float(team) > 0 and float(split) > 0
        assert abs(float(ratio) - float(split) / float(team)) < 0.01


def test_serve_benchmark_compares_http_with_in_process_in_interleaved_blocks(models_dir, tmp_path):
    """benchmarks/serve.py end to end on the tiny models: the latency table, and the HTTP / in-process figures as
    medians of interleaved blocks, each block printed with both sides."""
    out = tmp_path / "performance.md"
    cmd = [sys.executable, "benchmarks/serve.py", "--models", str(models_dir), "--requests", "3", "--total", "64",
           "--blocks", "3", "--block-requests", "2", "--block-total", "32", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = out.read_text()
    blocks = re.findall(r"(\d+): ([\d.]+) / ([\d.]+) ms, ([\d.]+) / ([\d.]+)(?: / ([\d.]+))? images/s", text)
    assert [int(b[0]) for b in blocks] == [1, 2, 3], text
    ratios = sorted(float(b[1]) / float(b[2]) for b in blocks)  # from the printed (rounded) milliseconds
    row = next(line for line in text.splitlines() if line.startswith("| HTTP p50 / in-process p50"))
    figure = row.split("|")[2].strip()
    assert "× (middle half" in figure, row
    assert abs(float(figure.split("×")[0]) - ratios[1]) <= 0.05 * ratios[1] + 0.01, (row, ratios)  # the median block
    assert "| 32 clients batched over HTTP / in-process batch 32 (before PNG; median of 3 blocks) |" in text


def test_gil_benchmark_times_eager_and_graphs_alone_beside_python_and_split(models_dir):
    """benchmarks/gil.py: a row per way (eager, graphs) with ms per batch alone, beside a thread running Python,
    and the split's images/s."""
    cmd = [sys.executable, "benchmarks/gil.py", "--model", str(models_dir / "tiny-student"), "--batch", "2",
           "--rounds", "1", "--repeat", "1", "--seconds", "0.2"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| eager") or
            line.startswith("| graphs")]  # fmt: skip
    assert [r[0].strip() for r in rows] == ["eager", "graphs"], run.stdout
    assert all(float(x) > 0 for r in rows for x in r[1:]), run.stdout
