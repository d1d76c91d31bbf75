"""Shared fixtures: tiny models trained for a few steps on synthetic digits (no download, seconds)."""

from __future__ import annotations

import os

# The kernel tests run Triton on CPU tensors through its interpreter, which must be switched on before Triton
# is first imported; it changes nothing for tests that never launch a Triton kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import run_stage  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ae(tmp_path_factory) -> Path:
    return run_stage(tmp_path_factory.mktemp("ae"), stage="autoencoder", name="tiny-ae", max_steps=3)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_ae) -> Path:
    return run_stage(
        tmp_path_factory.mktemp("teacher"), stage="teacher", name="tiny-teacher", autoencoder=str(tiny_ae), max_steps=3
    )


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return run_stage(tmp_path_factory.mktemp("clf"), stage="classifier", name="tiny-classifier", max_steps=3)
