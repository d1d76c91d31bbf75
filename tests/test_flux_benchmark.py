"""benchmarks/flux.py: the smoke run's report (rows, agreement, skipped Triton row, memory table) and its refusals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "benchmarks/flux.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the benchmark never interprets
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def table_row(report: str, name: str) -> list[str]:
    lines = [line for line in report.splitlines() if line.startswith(f"| {name} |")]
    assert len(lines) == 1, f"no single row {name!r} in:\n{report}"
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def gb(report: str, name: str) -> float:
    return float(table_row(report, name)[2])


@pytest.mark.slow
def test_smoke_report(tmp_path):
    out = tmp_path / "flux.md"
    proc = run("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert report.strip() in proc.stdout  # printed and written alike
    assert "`python benchmarks/flux.py --smoke --out " in report
    import diffusers

    assert f"torch {torch.__version__}; diffusers {diffusers.__version__}" in report
    assert ("Device: **CPU**" in report) != torch.cuda.is_available()
    assert "dtype float32" in report and "256 packed image tokens" in report and "64 text tokens" in report

    # one step: implementation | ms | speed-up | max diff / std | mean diff / std | peak | note
    mine = table_row(report, "fewstep MMDiT, PyTorch SDPA")
    theirs = table_row(report, "diffusers FluxTransformer2DModel")
    assert float(mine[1]) > 0 and float(theirs[1]) > 0
    assert float(mine[3]) < 1e-4  # fp32, same weights: the same function
    assert theirs[3] == "(reference)"
    triton = table_row(report, "fewstep MMDiT, Triton kernels")
    if torch.cuda.is_available():
        assert float(triton[1]) > 0 and float(triton[3]) < 1e-3, triton
    else:
        assert triton[1] == "—"
        assert (
            "skipped: no CUDA device: Triton kernels run on GPUs; tests/kernels checks them in the interpreter"
            in (triton[-1])
        )

    # the pair's memory: exact parameter arithmetic on the meta device
    assert gb(report, "T5-XXL encoder") > 9.0  # 4.76 B parameters at 2 bytes
    assert 23.0 < gb(report, "transformer, FLUX.1-dev (guidance embedding)") < 25.0
    saved = re.search(r"\| saved \| ([\d.]+) \(([\d,]+) bytes\) \|", report)
    assert saved and int(saved[2].replace(",", "")) > 0
    shared = sum(
        gb(report, n) for n in ("CLIP-L text encoder", "T5-XXL encoder", "VAE (AutoencoderKL, 16 latent channels)")
    )
    assert float(saved[1]) == pytest.approx(shared, abs=0.02)


def test_without_smoke_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the full benchmark would run")
    proc = run()
    assert proc.returncode == 2
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and "--smoke" in message, message
    assert proc.stdout == ""


def test_out_is_never_overwritten(tmp_path):
    out = tmp_path / "flux.md"
    out.write_text("earlier results\n")
    proc = run("--smoke", "--out", str(out))
    assert proc.returncode == 2
    assert str(out) in proc.stderr and "--overwrite" in proc.stderr
    assert out.read_text() == "earlier results\n"
