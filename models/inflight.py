"""A batch sampled one step at a time, which rows join and leave at step boundaries (continuous batching).

The server runs many-step work (a teacher at 40 steps) through this, one model evaluation per call, so that
student batches run between its steps and new requests for the same (model, steps, guidance) join the batch
already on the device instead of waiting for it to end (Orca-style iteration-level scheduling, Yu et al. 2022,
applied to a sampler's steps).

Every row carries its own position k on the shared time grid: one forward pass takes the per-row times
t = grid[k] (the transformer reads t per sample), so a row that joined at step 0 and a row at step 30 share the
pass. A row's result equals ``TextToImage.generate`` for its prompt and seed (same noise, same grid, same
sampler; batch-independent up to float rounding).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from fewstep.models.sampling import hash_seed, seeded_noise
from fewstep.models.text import TextCond


@dataclass
class _Row:
    owner: Hashable  # who the row belongs to (the server's job)
    seed: int


class InFlight:
    def __init__(self, model, steps: int, guidance: float | None = None):
        """``model``: a TextToImage (models/pipeline.py). The grid and sampler are the ones ``generate`` uses."""
        self.model = model
        self.steps = steps
        self.guidance = model.sampling.guidance if guidance is None else guidance
        self.grid = torch.tensor(model.grid(steps), dtype=torch.float32, device=model.device)  # (steps + 1,)
        self.euler = model.sampling.sampler == "euler"
        self.rows: list[_Row] = []
        self.x: torch.Tensor | None = None  # (R, C, h, w) the rows' current latents
        self.k = torch.zeros(0, dtype=torch.long, device=model.device)  # (R,) steps taken per row
        self.cond: TextCond | None = None
        self._fn = None  # the velocity function over the current rows; rebuilt when rows change

    def __len__(self) -> int:
        return len(self.rows)

    def owners(self) -> list[Hashable]:
        return list(dict.fromkeys(r.owner for r in self.rows))

    def add(self, owner: Hashable, prompts: Sequence[str], seeds: Sequence[int], cond: TextCond | None = None):
        """Rows for ``prompts``/``seeds`` start at step 0 with the seeds' noise (as ``generate`` draws it)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        m = self.model
        cond = m.encode_text(list(prompts)) if cond is None else cond
        noise = seeded_noise(seeds, m.latent_shape, m.device)
        self.rows += [_Row(owner, int(s)) for s in seeds]
        self.x = noise if self.x is None else torch.cat([self.x, noise])
        self.k = torch.cat([self.k, torch.zeros(len(seeds), dtype=torch.long, device=m.device)])
        self.cond = cond if self.cond is None else self.cond.cat(cond)
        self._fn = None

    def drop(self, owner: Hashable) -> None:
        """Remove an owner's rows (a cancelled request): the next step no longer computes them."""
        self._keep(torch.tensor([r.owner != owner for r in self.rows], dtype=torch.bool))

    @torch.no_grad()
    def step(self) -> None:
        """One model evaluation for every row: t = grid[k] -> grid[k + 1]."""
        if not self.rows:
            return
        if self._fn is None:
            fn = self.model.velocity_fn(self.cond, self.guidance)
            self._fn = fn if self.euler else self.model.denoiser(fn)
        t, t_next = self.grid[self.k], self.grid[self.k + 1]  # (R,), (R,)
        if self.euler:
            v = self._fn(self.x, t)
            self.x = self.x + (t_next - t).view(-1, 1, 1, 1) * v
        else:  # multistep consistency sampling (models/sampling.sample_x0), per row
            x0 = self._fn(self.x, t)
            last = t_next <= 0
            eps = seeded_noise(
                [hash_seed(r.seed, int(k) + 1) for r, k in zip(self.rows, self.k.tolist(), strict=True)],
                tuple(self.x.shape[1:]),
                self.x.device,
            )
            tn = t_next.view(-1, 1, 1, 1)
            self.x = torch.where(last.view(-1, 1, 1, 1), x0, (1 - tn) * x0 + tn * eps)
        self.k = self.k + 1

    @torch.no_grad()
    def pop_done(self) -> dict[Hashable, torch.Tensor]:
        """Decoded images (clamped to [-1, 1]) of every owner whose rows have all taken their last step."""
        if not self.rows:
            return {}
        done_row = (self.k >= self.steps).tolist()
        pending = {r.owner for r, d in zip(self.rows, done_row, strict=True) if not d}
        finished = [o for o in self.owners() if o not in pending]
        if not finished:
            return {}
        take = torch.tensor([r.owner in finished for r in self.rows], dtype=torch.bool)
        images = self.model.decode(self.x[take.to(self.x.device)]).clamp(-1, 1).cpu()
        owners = [r.owner for r, t in zip(self.rows, take.tolist(), strict=True) if t]
        out = {o: images[[i for i, x in enumerate(owners) if x == o]] for o in finished}
        self._keep(~take)
        return out

    def remaining_steps(self) -> int:
        """Model evaluations left before every row now in the batch is done."""
        return 0 if not self.rows else int(self.steps - self.k.min())

    def _keep(self, keep: torch.Tensor) -> None:
        if bool(keep.all()):
            return
        idx = keep.nonzero().flatten()
        self.rows = [self.rows[i] for i in idx.tolist()]
        dev = self.x.device
        self.x, self.k = self.x[idx.to(dev)], self.k[idx.to(dev)]
        c = self.cond
        self.cond = TextCond(c.tokens[idx.to(dev)], c.mask[idx.to(dev)], c.pooled[idx.to(dev)])
        if not self.rows:
            self.x, self.cond = None, None
        self._fn = None
