"""Which kernel backend runs: the modes, how "auto" resolves on a device, and what Triton needs there.

Modes (issue 5): "auto" = Triton on CUDA when Triton imports, PyTorch elsewhere; "triton" = forced (a CPU
needs TRITON_INTERPRET=1, set before Triton is imported); "torch" = the PyTorch references everywhere.
The mode is parsed once (CLI flag, server setting or FEWSTEP_KERNELS) and passed down to the model, which
stores the resolved backend; nothing below reads the environment per call.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import torch

from fewstep.errors import UsageError

MODES = ("auto", "triton", "torch")
ENV_VAR = "FEWSTEP_KERNELS"


class KernelError(UsageError):
    """A kernel mode that cannot run here, with the reason and the fix."""


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """ "auto" (CUDA when torch sees one, else CPU), "cpu" or "cuda" -> the device; ranks spread over the GPUs."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("device cuda requested but torch sees no CUDA device")
        return torch.device("cuda", rank % torch.cuda.device_count())
    if name != "cpu":
        raise UsageError(f"device must be auto, cpu or cuda, not {name!r}")
    return torch.device("cpu")


def parse_mode(value: str | None, source: str = ENV_VAR) -> str:
    """'' or None -> "auto"; anything outside MODES is an error naming where it came from."""
    mode = (value or "auto").strip().lower()
    if mode not in MODES:
        raise KernelError(f"{source}={value!r}: expected one of {', '.join(MODES)}")
    return mode


def mode_from_env(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return parse_mode(environ.get(ENV_VAR), ENV_VAR)


def interpreting() -> bool:
    """Triton's CPU interpreter (numpy) is on: kernels run on CPU tensors, one program at a time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(mode: str, device: torch.device | str) -> str:
    """-> "triton" or "torch" for a model on ``device``; raises KernelError when "triton" cannot run."""
    mode = parse_mode(mode, "kernels")
    device = torch.device(device)
    if mode == "torch":
        return "torch"
    if mode == "auto":
        return "triton" if device.type == "cuda" and triton_available() and not interpreting() else "torch"
    if not triton_available():
        raise KernelError("kernels=triton but Triton is not installed (pip install triton)")
    if device.type == "cuda":
        if interpreting():
            raise KernelError(
                "kernels=triton on CUDA with TRITON_INTERPRET=1: the interpreter runs on CPU "
                "tensors only; unset TRITON_INTERPRET"
            )
        return "triton"
    if device.type == "cpu":
        if not interpreting():
            raise KernelError(
                "kernels=triton on a CPU needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "(slow; for tests), or use kernels=torch / auto"
            )
        return "triton"
    raise KernelError(f"kernels=triton runs on CUDA (or CPU with TRITON_INTERPRET=1), not on {device.type}")
