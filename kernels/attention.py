"""Non-causal multi-head attention with an optional key-padding mask.

Reference semantics: out = softmax(q kᵀ / sqrt(D) + mask) v, with masked keys at −inf, written in the
(B, L, H·D) layout that the output projection reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None):
    """q, k, v: (B, H, L, D); key_mask: (B, L) bool, True = attend. Returns (B, L, H·D).

    The PyTorch path: torch's SDPA picks its fastest backend for the device.
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return rearrange(out, "B H L D -> B L (H D)")
