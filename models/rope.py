"""Rotary position tables over (index, row, col) axes, as in Flux's EmbedND.

Image tokens sit at (0, row, col); text tokens all at (0, 0, 0), so RoPE leaves them unrotated.
Each axis a gets axes_dim[a] dims of the head: freq_j = theta^(−2j/d_a), angle = pos · freq_j.
"""

from __future__ import annotations

import torch


def position_ids(n_txt: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(n_txt + grid_h·grid_w, 3) integer positions, text first."""
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return torch.cat([torch.zeros(n_txt, 3, dtype=img.dtype), img])


def rope_tables(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (L, n_axes) -> cos, sin each (L, sum(axes_dim)/2) in fp32."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
        angles.append(ids[:, axis, None].double() * freqs[None])  # (L, dim/2)
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()
