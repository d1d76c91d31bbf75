"""The one training loop every stage and recipe shares.

A *recipe* (training/recipe.py) supplies a loss module and batches; the loop supplies everything else: AdamW
with warmup and cosine decay, gradient clipping, EMA weights, bf16 autocast on CUDA, resumable state (the
recipe's auxiliary networks included), a progress bar with loss and images/s, a JSONL metrics log, a
wall-clock budget, and DistributedDataParallel or FSDP2 (``parallel: fsdp``: the model sharded across processes).

Determinism across world sizes: every rank draws the same *global* batch from a generator seeded by
(seed, step) and keeps rows rank::world, so N processes compute the same gradient as one process does
(DDP averages the per-rank means; equal shards make that the global mean).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from fewstep.errors import UsageError
from fewstep.kernels.runtime import resolve_device
from fewstep.training import distributed
from fewstep.training.config import LoopConfig, loop_settings
from fewstep.training.recipe import Context, Recipe


@dataclass
class RunInfo:
    step: int = 0
    seconds: float = 0.0  # training time summed over resumes
    images: int = 0


def lr_at(cfg: LoopConfig, step: int, seconds: float = 0.0) -> float:
    """Linear warmup, then cosine decay to lr·min_lr_ratio at max_steps, or at the wall-clock budget
    (max_minutes) if that comes first: a run cut short by its budget still ends on a decayed learning rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.max_minutes:
        progress = max(progress, min(1.0, seconds / (60 * cfg.max_minutes)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def shard(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    if world == 1:
        return batch
    out = {}
    for k, v in batch.items():
        out[k] = v[rank::world] if isinstance(v, (torch.Tensor, list)) else v
    return out


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(cfg: LoopConfig, recipe: Recipe, out_dir: str | Path | None = None, quiet: bool = False) -> RunInfo:
    """Train ``recipe`` per ``cfg``; resumes from ``out/state.pt`` when present. Returns what was done.

    The exported card's ``training`` records the loop's settings and ``cfg.settings_record()`` (the stage's or
    the method's own settings) only.
    """
    rank, world = _dist_info()
    if cfg.batch_size % world:
        raise UsageError(f"batch_size {cfg.batch_size} must divide by the {world} processes")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise UsageError(f"parallel must be ddp or fsdp, not {cfg.parallel!r}")
    sharded = world > 1 and cfg.parallel == "fsdp"
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(out_dir or cfg.out)
    device = resolve_device(cfg.device, rank)
    module = recipe.module.to(device)
    ema = copy.deepcopy(module).requires_grad_(False).eval()
    wrapped: nn.Module = module
    template = None
    if sharded:  # FSDP2 shards the model and its EMA alike (the EMA update is then shard by shard)
        template = copy.deepcopy(ema).to("meta")  # what a gathered export is loaded into
        distributed.fully_shard_model(module, device)
        distributed.fully_shard_model(ema, device)
    elif world > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    ctx = Context(device=device, module=wrapped, world=world, betas=cfg.betas, grad_clip=cfg.grad_clip)
    recipe.setup(ctx)  # registers the recipe's auxiliaries before their state is resumed
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    info = RunInfo()
    state_path = out / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu" if sharded else device, weights_only=True)
        if sharded:  # a full state (saved gathered), scattered back into this rank's shards
            distributed.load_full_state(module, state["module"])
            distributed.load_full_state(ema, state["ema"])
            distributed.load_optimizer_state(module, opt, state["opt"])
        else:
            module.load_state_dict(state["module"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
        info = RunInfo(**state["info"])
        for name, aux in ctx.auxiliaries.items():
            if name not in state.get("aux", {}):
                raise UsageError(f"{state_path} has no state for {name!r} (another method's run?): use a new --out")
            aux.load_state_dict(state["aux"][name])
        if rank == 0 and not quiet:
            print(f"resuming {out} at step {info.step}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(_record(cfg), indent=2))
    log = open(out / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115 (closed after the loop)

    def save_state() -> None:
        if sharded:  # every rank gathers; rank 0 writes the whole model, loadable by any world size
            weights = (distributed.full_state(module), distributed.full_state(ema))
            opt_state = distributed.optimizer_state(module, opt)
        elif rank == 0:
            weights, opt_state = (module.state_dict(), ema.state_dict()), opt.state_dict()
        if rank != 0:
            return
        state = {
            "module": weights[0],
            "ema": weights[1],
            "opt": opt_state,
            "info": vars(info),
            "aux": {name: aux.state_dict() for name, aux in ctx.auxiliaries.items()},
        }
        tmp = state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, state_path)

    on_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)
    bar = tqdm(total=cfg.max_steps, initial=info.step, disable=rank != 0 or quiet, dynamic_ncols=True, desc=cfg.name)
    start, window_t, window_img = time.time(), time.time(), 0
    seconds_before = info.seconds
    every_s = 60 * cfg.snapshot_minutes if cfg.snapshot_minutes else math.inf
    next_snapshot = (math.floor(info.seconds / every_s) + 1) * every_s if cfg.snapshot_minutes else math.inf

    def run_info() -> dict[str, Any]:
        return {"steps": info.step, "duration_s": round(info.seconds, 1), "images_seen": info.images, **_record(cfg)}

    def snapshot_clock(seconds: float) -> float:
        """The clock snapshots follow (-inf: none here). Under FSDP2 every rank takes part in an export (it gathers
        the model), on rank 0's clock, so that all ranks decide alike."""
        if not cfg.snapshot_minutes or not (sharded or rank == 0):
            return -math.inf
        return _rank0_value(seconds, device) if sharded else seconds

    def export(directory: Path) -> None:
        """The EMA model exported by rank 0; a sharded one is gathered by every rank first."""
        if sharded:
            state = distributed.full_state(ema)  # whole on rank 0, empty elsewhere
            if rank == 0:
                recipe.export(distributed.unsharded(template, state), directory, run_info())
        elif rank == 0:
            recipe.export(ema, directory, run_info())
            ema.to(device)  # exporting moved it to the CPU

    module.train()
    while info.step < cfg.max_steps:
        # under DDP every rank must use the same lr and stop at the same step: rank 0's clock decides
        clock = _rank0_value(info.seconds, device) if cfg.max_minutes else 0.0
        if cfg.max_minutes and clock >= 60 * cfg.max_minutes:
            if rank == 0 and not quiet:
                print(f"\nwall-clock budget of {cfg.max_minutes} min reached at step {info.step}")
            break
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + info.step)
        batch = recipe.prepare(shard(recipe.make_batch(g), rank, world), device)
        lr = lr_at(cfg, info.step, clock)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, logs = recipe.train_step(batch)  # auxiliaries (if any) are updated inside
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        opt.step()
        decay = min(cfg.ema_decay, (1 + info.step) / (10 + info.step)) if cfg.ema_warmup else cfg.ema_decay
        ema_update(ema, module, decay)
        info.step += 1
        info.images += cfg.batch_size
        window_img += cfg.batch_size
        info.seconds = seconds_before + time.time() - start

        if info.step % cfg.log_every == 0 or info.step == cfg.max_steps:
            logged = _global_mean(loss.detach(), world)  # every rank's shard: the loss one process would see
            ips = window_img / max(1e-9, time.time() - window_t)
            window_t, window_img = time.time(), 0
            row = {
                "step": info.step,
                "loss": logged,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "images_per_s": round(ips, 1),
                "elapsed_s": round(info.seconds, 1),
            }
            row.update({k: float(v) for k, v in logs.items()})
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{logged:.4f}", img_s=f"{ips:.0f}")
        bar.update(1)
        if info.step % cfg.ckpt_every == 0:
            save_state()
        now = snapshot_clock(info.seconds)
        if now >= next_snapshot:
            began = time.time()
            export(out / "snapshots" / f"step-{info.step:06d}")
            start += time.time() - began  # the export is not training time (the curve's minutes, max_minutes)
            next_snapshot = (math.floor(now / every_s) + 1) * every_s
    bar.close()
    save_state()
    if log:
        log.close()
    export(out / "export")
    if rank == 0:
        for aux in ctx.auxiliaries.values():
            if aux.exported:
                aux.export(out / "auxiliary")
    if world > 1:
        dist.barrier()
    return info


def _record(cfg: LoopConfig) -> dict[str, Any]:
    return {"loop": loop_settings(cfg), "settings": cfg.settings_record()}


def _global_mean(loss: torch.Tensor, world: int) -> float:
    if world == 1:
        return float(loss)
    t = loss.detach().float().clone()
    dist.all_reduce(t)
    return float(t) / world


def _rank0_value(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())
