"""fewstep's MMDiT in the seat of diffusers' FluxTransformer2DModel inside FluxPipeline.

The pipeline keeps everything else: transformers' CLIP and T5, the scheduler's shifted sigmas, the 2×2 packing,
the VAE. Only the transformer runs as fewstep's (Triton kernels on CUDA: models/ops.py), computing the same
function (tests/models/test_flux.py), so an image equals FluxPipeline's for the same arguments.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from torch import nn

from fewstep.models.flux import config_to_diffusers
from fewstep.models.mmdit import MMDiT


class FluxMMDiT(nn.Module):
    def __init__(self, mmdit: MMDiT):
        super().__init__()
        self.mmdit = mmdit
        # what FluxPipeline reads of its transformer's config
        self.config = SimpleNamespace(**config_to_diffusers(mmdit.cfg))

    @property
    def dtype(self) -> torch.dtype:
        return self.mmdit.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mmdit.img_in.weight.device

    def cache_context(self, name: str):
        """FluxPipeline names its cond/uncond passes for diffusers' step caches; there is nothing to cache here."""
        return contextlib.nullcontext()

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, h·w, 4·C) packed latents
        encoder_hidden_states: torch.Tensor,  # (B, Lt, 4096) T5 tokens
        pooled_projections: torch.Tensor,  # (B, 768) CLIP pooled
        timestep: torch.Tensor,  # (B,) sigma in [0, 1] (FluxPipeline divides by 1000)
        img_ids: torch.Tensor,  # (h·w, 3): (0, row, col), as models/rope.position_ids lays them out
        txt_ids: torch.Tensor,  # (Lt, 3) zeros
        guidance: torch.Tensor | None = None,
        return_dict: bool = True,
        **_: object,  # joint_attention_kwargs and ControlNet residuals: not supported, ignored as unset
    ):
        if hidden_states.dtype != torch.float32:
            # FluxTransformer2DModel multiplies t and the guidance scale by 1000 in its own dtype (bf16: 0.75 -> 752,
            # 3.5 -> 3504) before the sinusoid; fewstep embeds in fp32. Round as it does, so that a bf16 image is
            # FluxPipeline's image (benchmarks/flux.py measured the difference otherwise: ~1× the output's std).
            timestep = _as_diffusers_rounds(timestep, hidden_states.dtype)
            guidance = None if guidance is None else _as_diffusers_rounds(guidance, hidden_states.dtype)
        last = img_ids[-1].tolist()  # the bottom-right patch: (0, h - 1, w - 1)
        grid = (int(last[1]) + 1, int(last[2]) + 1)
        out = self.mmdit.forward_tokens(
            hidden_states, grid, timestep, encoder_hidden_states, None, pooled_projections, guidance
        )
        return SimpleNamespace(sample=out) if return_dict else (out,)


def _as_diffusers_rounds(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x such that 1000·x in fp32 is (x in ``dtype``)·1000 in ``dtype``: what diffusers' Flux embeds."""
    return (x.to(dtype) * 1000).float() / 1000
