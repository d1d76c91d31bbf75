"""benchmarks/reliability.py --quick runs end to end against `fewstep serve` over the zoo and writes its doc.

Only that it ran is checked here: every section present and none ended in an error row. Its pass/FAIL
outcomes are read from the doc (docs/reliability.md), not asserted, so this test does not gate on them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "## 1. Hostile requests",
    "## 2. Metrics cardinality",
    "## 3. Overload",
    "## 4. Fault injection",
    "## 5. Drain",
    "## 6. Slow clients",
)


@pytest.mark.slow
def test_reliability_quick_writes_every_section(tmp_path):
    out = tmp_path / "reliability.md"
    cmd = [sys.executable, "benchmarks/reliability.py", "--quick", "--models", "zoo", "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    doc = out.read_text()
    for heading in SECTIONS:
        assert heading in doc, f"{heading!r} missing from the doc"
    starts = [doc.index(h) for h in SECTIONS] + [len(doc)]
    for heading, start, end in zip(SECTIONS, starts[:-1], starts[1:], strict=True):
        assert "**section error**" not in doc[start:end], f"{heading} ended in an error: {doc[start:end][-600:]}"
