"""A word-level tokenizer over the caption vocabulary and a small transformer text encoder.

They stand in for Flux's T5 (token features for the text stream) and CLIP (the pooled vector for adaLN).
An unknown word maps to [UNK]; it is never an error. Captions are padded to a fixed length so that an
image's result never depends on which other prompts share its batch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fewstep.models import graphs
from fewstep.models.config import TextEncoderConfig

PAD, BOS, UNK = "[PAD]", "[BOS]", "[UNK]"
_WORD = re.compile(r"[a-z0-9]+")


class Tokenizer:
    def __init__(self, words: list[str], max_length: int):
        self.vocab = [PAD, BOS, UNK] + [w for w in words if w not in (PAD, BOS, UNK)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, max_length) long, mask (B, max_length) bool. Over-long captions are cut."""
        unk = self.index[UNK]
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            toks = [self.index[BOS]] + [self.index.get(w, unk) for w in self.words(text)]
            toks = toks[: self.max_length]
            ids[row, : len(toks)] = torch.tensor(toks)
        mask = ids != self.index[PAD]
        return ids, mask

    def to_json(self) -> str:
        return json.dumps({"vocab": self.vocab, "max_length": self.max_length}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        d = json.loads(text)
        return cls(d["vocab"], d["max_length"])

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        return cls.from_json(Path(path).read_text())


@dataclass
class TextCond:
    """What the transformer reads from a caption."""

    tokens: torch.Tensor  # (B, L, dim)
    mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, dim)

    def cat(self, other: TextCond) -> TextCond:
        return TextCond(*(torch.cat([a, b]) for a, b in zip(self.fields(), other.fields(), strict=True)))

    def fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tokens, self.mask, self.pooled


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "B L (K H D) -> K B H L D", K=3, H=self.heads)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(rearrange(attn, "B H L D -> B L (H D)"))
        return x + self.mlp(self.norm2(x))


class TextEncoder(graphs.GraphsOwner):
    graph_method = "_tokens"  # inference as frozen graphs (use_graphs, models/graphs.py)

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.max_length, cfg.dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(cfg.dim, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextCond:
        x = graphs.run(self.graphs, self._tokens, ids, mask)  # (B, L, dim)
        return TextCond(tokens=x, mask=mask, pooled=x[:, 0])  # pooled = the BOS token's output

    def _tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, L, dim)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)
