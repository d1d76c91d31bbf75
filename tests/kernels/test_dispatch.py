"""The kernel mode: parsing, resolution per device, and the model running the same code on both backends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.kernels.runtime import KernelError, mode_from_env, parse_mode, resolve
from fewstep.models import ops
from fewstep.models.config import get_variant
from fewstep.models.pipeline import TextToImage
from fewstep.models.text import Tokenizer
from fewstep.training.data import caption_vocabulary

ZOO = Path(__file__).resolve().parents[2] / "zoo"


def test_modes_parse_and_resolve():
    assert mode_from_env({}) == "auto"
    assert mode_from_env({"FEWSTEP_KERNELS": " Torch "}) == "torch"
    with pytest.raises(KernelError, match="FEWSTEP_KERNELS='cuda'"):
        mode_from_env({"FEWSTEP_KERNELS": "cuda"})
    with pytest.raises(KernelError, match="--kernels='x'"):
        parse_mode("x", "--kernels")
    assert resolve("auto", "cpu") == "torch"  # auto never forces the interpreter on a CPU
    assert resolve("torch", "cpu") == "torch"
    assert resolve("triton", "cpu") == "triton"  # TRITON_INTERPRET=1 is on in the tests


def test_forced_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        resolve("triton", "cpu")


def tiny_model() -> TextToImage:
    torch.manual_seed(0)
    cfg = get_variant("digits")  # the shipped models' shapes: head_dim 64, 16 image + 12 text tokens
    model = TextToImage.build(cfg, Tokenizer(caption_vocabulary(), cfg.text.max_length))
    for p in model.transformer.parameters():  # the model starts zero-initialised: give it real outputs
        torch.nn.init.normal_(p, std=0.05)
    return model.to("cpu")


def test_model_forward_is_the_same_on_both_backends():
    model = tiny_model()
    x = torch.randn(3, *model.latent_shape)
    cond = model.encode_text(["a red 7", "a 7 on black", "red"])  # different lengths: padded text tokens
    t = torch.tensor([0.2, 0.5, 0.9])
    ref = model.transformer(x, t, *cond.fields())
    out = model.use_kernels("triton").transformer(x, t, *cond.fields())
    assert model.kernels == "triton"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_autograd_takes_the_reference_path():
    """The Triton kernels are forward-only: with grads recorded the references run, so gradients flow."""
    q = torch.randn(1, 2, 5, 32, requires_grad=True)
    out = ops.attention(q, q, q, None, backend="triton")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def _sample(tmp: Path, mode: str) -> np.ndarray:
    out = tmp / mode
    env = {**os.environ, "FEWSTEP_KERNELS": mode, "TRITON_INTERPRET": "1"}
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red 7 on black\na blue 3 on yellow\n")
    # 4 steps, not the teacher's 40: the interpreter takes ~0.1-0.3 s per kernel launch (25 launches per step);
    # at 4 steps the teacher already draws the right digit in the right colors (docs/results.md)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fewstep.cli",
            "sample",
            "--model",
            str(ZOO / "digits-teacher"),
            "--prompts-file",
            str(prompts),
            "--out",
            str(out),
            "--steps",
            "4",
            "--device",
            "cpu",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    return np.stack([np.asarray(Image.open(out / f"{i:06d}.png"), dtype=np.int16) for i in range(2)])


def test_shipped_teacher_images_match_within_2_of_255(tmp_path):
    """FEWSTEP_KERNELS=triton and =torch through `fewstep sample` on the shipped teacher: same PNGs ± 2/255."""
    triton_px, torch_px = _sample(tmp_path, "triton"), _sample(tmp_path, "torch")
    assert np.abs(triton_px - torch_px).max() <= 2
    assert torch_px.std() > 10  # real images, not blanks that would match trivially


def test_kernel_benchmark_runs(tmp_path):
    """benchmarks/kernel_bench.py --smoke: every kernel runs through the benchmark and agrees with its reference."""
    out = tmp_path / "kernels.md"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_bench.py"
    run = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert run.returncode == 0, run.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| smoke |")]
    assert {r.split("|")[2].strip() for r in rows} == {"qk_norm_rope", "attention", "adaln_modulate"}
    errs = [float(r.split("|")[7]) for r in rows if r.split("|")[7].strip() not in ("—", "")]
    assert len(errs) == 3 and max(errs) < 1e-4
