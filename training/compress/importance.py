"""How much each transformer block matters, by three criteria on one calibration batch. Lower = less important.

- ``io_mse``: the mean squared difference between a block's input and output hidden states; a block that barely
  changes its input can go (the criterion behind Flux.1 Lite).
- ``bi``: ShortGPT's Block Influence (Men et al. 2024), 1 − cos(input, output) averaged over tokens: the same
  question asked of directions only, blind to scale.
- ``output_loss``: the mean squared change of the model's velocity when the block alone is skipped: what removing
  it costs the output, before any retraining (the most direct and the most expensive: one forward per block).

Hidden states are the image tokens (what reaches the output; padding text tokens would dilute both input-output
criteria). The calibration batch noises real data at times spread over (0, 1), so blocks that matter at one
noise level only still show up.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.models.mmdit import MMDiT
from fewstep.models.text import TextCond

CRITERIA = ("io_mse", "output_loss", "bi")


def block_names(model: MMDiT) -> list[str]:
    """The blocks in forward order: double.0, ..., single.0, ... (the order of ``return_features``)."""
    return [f"double.{i}" for i in range(len(model.double_blocks))] + [
        f"single.{i}" for i in range(len(model.single_blocks))
    ]


def io_mse(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """(B, L, D) hidden states before and after a block -> mean squared change."""
    return (x_out.float() - x_in.float()).pow(2).mean()


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """ShortGPT's BI: 1 − the cosine between a token's input and output state, averaged over tokens."""
    return 1 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1).mean()


class _PassDouble(nn.Module):
    def forward(self, img, txt, *args, **kwargs):
        return img, txt


class _PassSingle(nn.Module):
    def forward(self, xs, *args, **kwargs):
        return xs


@contextmanager
def skipping(model: MMDiT, name: str) -> Iterator[None]:
    """The model with block ``name`` replaced by the identity, restored afterwards."""
    kind, index = name.split(".")
    blocks = model.double_blocks if kind == "double" else model.single_blocks
    original = blocks[int(index)]
    blocks[int(index)] = _PassDouble() if kind == "double" else _PassSingle()
    try:
        yield
    finally:
        blocks[int(index)] = original


@dataclass(frozen=True)
class Calibration:
    x_t: torch.Tensor  # (B, C, H, W) noised data latents
    t: torch.Tensor  # (B,)
    cond: TextCond
    guidance: torch.Tensor | None = None  # (B,) for a model that embeds the scale (FLUX.1-dev)


@dataclass(frozen=True)
class Ranking:
    blocks: list[str]
    scores: dict[str, dict[str, float]]  # criterion -> block -> score

    def order(self, criterion: str) -> list[str]:
        """Blocks from least to most important by ``criterion``."""
        return sorted(self.blocks, key=lambda b: self.scores[criterion][b])

    def least(self, criterion: str, k: int) -> list[str]:
        return self.order(criterion)[:k]

    def disagreements(self, k: int) -> list[str]:
        """Where the criteria part ways: which blocks each would remove first (k of them), and the blocks whose
        rank differs by two or more places between criteria."""
        lines = []
        chosen = {c: sorted(self.least(c, k), key=self.blocks.index) for c in self.scores}
        if len({tuple(v) for v in chosen.values()}) > 1:
            lines.append(
                f"the {k} blocks each criterion would remove differ: "
                + "; ".join(f"{c}: {', '.join(v)}" for c, v in chosen.items())
            )
        else:
            lines.append(f"all criteria would remove the same {k}: {', '.join(next(iter(chosen.values())))}")
        ranks = {c: {b: i for i, b in enumerate(self.order(c))} for c in self.scores}
        for b in self.blocks:
            r = {c: ranks[c][b] for c in ranks}
            if max(r.values()) - min(r.values()) >= 2:
                lines.append(f"{b} ranks " + ", ".join(f"{i + 1} by {c}" for c, i in r.items()))
        return lines

    def to_json(self) -> str:
        return json.dumps({"blocks": self.blocks, "scores": self.scores}, indent=2)

    def to_markdown(self, k: int) -> str:
        crit = list(self.scores)
        ranks = {c: {b: i + 1 for i, b in enumerate(self.order(c))} for c in crit}
        head = "| block | " + " | ".join(f"{c} (rank)" for c in crit) + " |"
        rows = [head, "|---|" + "---:|" * len(crit)]
        for b in self.blocks:
            rows.append(f"| {b} | " + " | ".join(f"{self.scores[c][b]:.4g} ({ranks[c][b]})" for c in crit) + " |")
        notes = "\n".join(f"- {line}" for line in self.disagreements(k))
        return (
            "Block importance on the calibration batch; rank 1 = least important (removed first).\n\n"
            + "\n".join(rows)
            + "\n\n"
            + notes
            + "\n"
        )


@torch.no_grad()
def rank_blocks(model: MMDiT, calib: Calibration, criteria: tuple[str, ...] = CRITERIA, chunk: int = 16) -> Ranking:
    """Scores per criterion, over the calibration batch in chunks of ``chunk`` images: each chunk's hidden states
    are reduced to sums as the hooks see them, so memory holds one chunk's activations, never the batch's (a
    Flux-sized model ranks on the GPU it trains on)."""
    unknown = set(criteria) - set(CRITERIA)
    if unknown:
        raise ValueError(f"unknown criteria {sorted(unknown)}; known: {', '.join(CRITERIA)}")
    names = block_names(model)
    n_img = calib.x_t.shape[-2] * calib.x_t.shape[-1] // model.cfg.patch_size**2
    # per block, each chunk's criterion weighted by its share of the batch: the batch's mean, one chunk in memory
    sums = {k: dict.fromkeys(names, 0.0) for k in ("io_mse", "bi", "output_loss")}

    def hook(name: str, weight: float):
        def reduce(module, args, output):
            if name.startswith("double"):
                x_in, x_out = args[0], output[0]  # the image stream
            else:
                x_in, x_out = args[0][:, -n_img:], output[:, -n_img:]  # the image tokens of the joint stream
            sums["io_mse"][name] += weight * float(io_mse(x_in, x_out))
            sums["bi"][name] += weight * float(block_influence(x_in, x_out))

        return reduce

    blocks = [*model.double_blocks, *model.single_blocks]
    for lo in range(0, len(calib.t), chunk):
        x_t, t = calib.x_t[lo : lo + chunk], calib.t[lo : lo + chunk]
        c = calib.cond
        tokens, mask, pooled = c.tokens[lo : lo + chunk], c.mask[lo : lo + chunk], c.pooled[lo : lo + chunk]
        g = None if calib.guidance is None else calib.guidance[lo : lo + chunk]
        weight = len(t) / len(calib.t)
        handles = [b.register_forward_hook(hook(n, weight)) for n, b in zip(names, blocks, strict=True)]
        try:
            full = model(x_t, t, tokens, mask, pooled, guidance=g)
        finally:
            for h in handles:
                h.remove()
        if "output_loss" in criteria:
            for n in names:
                with skipping(model, n):
                    v = model(x_t, t, tokens, mask, pooled, guidance=g)
                sums["output_loss"][n] += weight * float((v.float() - full.float()).pow(2).mean())
    return Ranking(names, {criterion: sums[criterion] for criterion in criteria})
