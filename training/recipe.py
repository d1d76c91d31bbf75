"""The one recipe protocol every stage and distillation method implements, and the helper that owns a recipe's
auxiliary networks.

A recipe wraps what it trains (``module``: a loss module around the student) and what it trains from (a frozen
teacher, data). The loop owns everything else: optimiser, schedule, EMA, DDP, resumable state, export.

    setup(ctx)           once, before resuming: move frozen networks to ctx.device, register auxiliaries
    make_batch(g)        the global batch on the CPU, drawn from g (the same on every rank)
    prepare(batch, dev)  this rank's shard -> inputs on the device (encode images and captions)
    train_step(batch)    -> (loss of ``module``, logs); updates auxiliaries itself; the loop backpropagates loss
    export(ema, dir, info)  write the trained model (EMA weights) as a checkpoint
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import nn


class Recipe(Protocol):
    module: nn.Module  # optimised, EMA-averaged and exported by the loop

    def setup(self, ctx: Context) -> None: ...

    def make_batch(self, generator: torch.Generator) -> dict[str, Any]: ...

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]: ...

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]: ...

    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]) -> Any: ...


class Auxiliary:
    """A network a recipe trains or tracks beside its module: DMD2's fake score, LADD's discriminator heads,
    the consistency target. It lives on the run's device, is DDP-wrapped when trained across processes, has its
    own AdamW (``lr`` None: not optimised, e.g. an EMA target), and is saved with the run's state and exported
    as ``OUT/auxiliary/NAME.safetensors`` (the student's checkpoint stays strict)."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        device: torch.device,
        world: int,
        lr: float | None,
        betas: tuple[float, float],
        grad_clip: float | None,
        export: bool,
    ):
        self.name, self.grad_clip, self.exported = name, grad_clip, export
        self.module = module.to(device)
        self.opt: torch.optim.Optimizer | None = None
        self.wrapped: nn.Module = self.module
        if lr is not None:
            self.module.train().requires_grad_(True)
            self.opt = torch.optim.AdamW(self.module.parameters(), lr=lr, betas=betas)
            if world > 1:
                ids = [device.index] if device.type == "cuda" else None
                self.wrapped = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.module.eval().requires_grad_(False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through the DDP wrapper (gradients synchronised across ranks)."""
        return self.wrapped(*args, **kwargs)

    def update(self, loss: torch.Tensor) -> None:
        """One optimiser step on ``loss``; leaves no gradient behind for anyone else to use."""
        assert self.opt is not None, f"auxiliary {self.name} is not optimised"
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "opt": self.opt.state_dict() if self.opt else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        if self.opt is not None and state.get("opt") is not None:
            self.opt.load_state_dict(state["opt"])

    def export(self, directory: Path) -> Path:
        path = directory / f"{self.name}.safetensors"
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous().cpu().clone() for k, v in self.module.state_dict().items()}
        save_file(tensors, str(path))
        return path


@dataclass
class Context:
    """What the loop hands a recipe in ``setup``."""

    device: torch.device
    module: nn.Module  # the recipe's module, DDP-wrapped when distributed: call this one to train
    world: int = 1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = 1.0
    auxiliaries: dict[str, Auxiliary] = field(default_factory=dict)

    def auxiliary(
        self,
        name: str,
        module: nn.Module,
        lr: float | None = None,
        betas: tuple[float, float] | None = None,
        export: bool = False,
    ) -> Auxiliary:
        if name in self.auxiliaries:
            raise ValueError(f"auxiliary {name!r} registered twice")
        aux = Auxiliary(name, module, self.device, self.world, lr, betas or self.betas, self.grad_clip, export)
        self.auxiliaries[name] = aux
        return aux


class RecipeBase:
    """Defaults for recipes whose module's forward(**batch) returns (loss, logs) and that need no auxiliaries."""

    module: nn.Module
    ctx: Context

    def setup(self, ctx: Context) -> None:
        self.ctx = ctx

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.ctx.module(**batch)
