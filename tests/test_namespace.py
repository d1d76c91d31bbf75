"""Run from a checkout's root, the top-level folders (kernels/, models/, ...) must not shadow installed packages of
the same names: transformers imports Hugging Face's ``kernels`` whenever its distribution is installed."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_kernels_package_wins_over_the_checkout_folder():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed here, so nothing can be shadowed")
    code = "import fewstep, kernels, transformers.activations; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).resolve().parent != ROOT / "kernels"


def test_no_benchmark_script_shadows_an_installed_module(tmp_path):
    """``python benchmarks/x.py`` puts benchmarks/ first on sys.path: a script named like an installed module
    (benchmarks/kernels.py did, once transformers depended on ``kernels``) breaks every import of that module."""
    stems = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    code = f"import importlib.util as u; print([n for n in {stems!r} if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"
