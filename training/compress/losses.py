"""The compression losses, as pure functions (tests/training/test_compress.py checks each by hand).

total = task_weight · task + output_weight · output_kd + feature_weight · feature_kd   (BK-SDM, eq. 1-3: 1/1/1)
"""

from __future__ import annotations

import torch

from fewstep.models.flow import velocity_target


def task_loss(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The teacher's own objective: rectified flow's velocity target ε − x0."""
    return (v.float() - velocity_target(x0, noise).float()).pow(2).mean()


def output_kd(v_student: torch.Tensor, v_teacher: torch.Tensor) -> torch.Tensor:
    """Output KD: the full model's velocity at the same (x_t, t, caption)."""
    return (v_student.float() - v_teacher.float()).pow(2).mean()


def feature_kd(
    student: list[torch.Tensor], teacher: list[torch.Tensor], sources: list[int], norm: str = "plain"
) -> torch.Tensor:
    """Feature KD: student block j against the full model's block ``sources[j]`` (the block it was copied from),
    summed over the kept blocks.

    plain: the MSE of each pair (BK-SDM). per_block: each MSE divided by the mean square of the full model's
    feature, a relative error, so that blocks whose activations are large (the last ones, here) do not outweigh
    the rest: the per-block scaling Flux-Mini applies to its feature terms.
    """
    if norm not in ("plain", "per_block"):
        raise ValueError(f"feature_norm {norm!r}: plain or per_block")
    total = torch.zeros((), device=student[0].device)
    for s, i in zip(student, sources, strict=True):
        t = teacher[i].float()
        mse = (s.float() - t).pow(2).mean()
        total = total + (mse / t.pow(2).mean().clamp_min(1e-12) if norm == "per_block" else mse)
    return total
