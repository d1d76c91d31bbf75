"""Kernel tests need Triton (its CPU interpreter here); helpers live in tests/kernels/helpers.py."""

import pytest

pytest.importorskip("triton", reason="Triton has no wheel for this platform; the PyTorch path is tested elsewhere")
