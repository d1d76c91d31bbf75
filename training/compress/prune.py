"""Which blocks stay, and the smaller transformer built from the full one's weights."""

from __future__ import annotations

import re
from dataclasses import replace

from fewstep.errors import UsageError
from fewstep.models.mmdit import MMDiT
from fewstep.training.compress.importance import Ranking, block_names

_SHORT = re.compile(r"^(d|s)(\d+)$")


def parse_keep(spec: str, names: list[str]) -> list[str]:
    """``double.0,single.3`` (or ``d0,s3``) -> the kept block names in forward order; an unknown or repeated
    name is an error that names it."""
    kept = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        m = _SHORT.match(item)
        name = f"{'double' if m[1] == 'd' else 'single'}.{m[2]}" if m else item
        if name not in names:
            raise UsageError(f"compress.keep: no block {item!r}; the model has {', '.join(names)}")
        if name in kept:
            raise UsageError(f"compress.keep: {item!r} is listed twice")
        kept.append(name)
    if not kept:
        raise UsageError("compress.keep: lists no block")
    return sorted(kept, key=names.index)


def removal_count(names: list[str], remove: int | None) -> int:
    """How many blocks go: ``remove``, or by default a third of them (the issue's and BK-SDM's order of magnitude)."""
    return len(names) // 3 if remove is None else remove


def choose_blocks(
    names: list[str], ranking: Ranking | None, criterion: str, remove: int | None, keep: str | None
) -> list[str]:
    """The blocks to keep: an explicit list, else all but the ``removal_count`` least important by ``criterion``."""
    if keep:
        return parse_keep(keep, names)
    k = removal_count(names, remove)
    if not 0 < k < len(names):
        raise UsageError(f"compress.remove: {k} of {len(names)} blocks; remove at least 1 and keep at least 1")
    if ranking is None or criterion not in ranking.scores:
        raise UsageError(f"compress.criterion: {criterion!r} was not measured")
    gone = set(ranking.least(criterion, k))
    return [n for n in names if n not in gone]


def prune(model: MMDiT, kept: list[str]) -> tuple[MMDiT, list[int]]:
    """A transformer with only the ``kept`` blocks, each initialised from the block it came from, and every
    other weight (embeddings, final layer) copied. -> (student, for each student block the index of its source
    block in the full model's forward order, i.e. in its ``return_features`` list)."""
    names = block_names(model)
    doubles = [int(n.split(".")[1]) for n in kept if n.startswith("double.")]
    singles = [int(n.split(".")[1]) for n in kept if n.startswith("single.")]
    cfg = replace(model.cfg, depth_double=len(doubles), depth_single=len(singles))
    state = {}
    for k, v in model.state_dict().items():
        m = re.match(r"^(double|single)_blocks\.(\d+)\.(.*)$", k)
        if m is None:
            state[k] = v
            continue
        order = doubles if m[1] == "double" else singles
        if int(m[2]) in order:
            state[f"{m[1]}_blocks.{order.index(int(m[2]))}.{m[3]}"] = v
    student = MMDiT(cfg, model.txt_in.in_features, model.latent_size).to(next(model.parameters()).device)
    student.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    student.set_kernels(model.kernels)
    return student, [names.index(n) for n in kept]
