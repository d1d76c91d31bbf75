"""``fewstep compress`` (and ``fewstep distill --method compress``): rank, remove, train back, export.

1. Rank every block on a calibration batch by each criterion (importance.py); write OUT/ranking.md and .json.
2. Keep an explicit list, or remove the K least important by the chosen criterion (prune.py); the student
   starts from the full model's weights.
3. Train the student with task loss + output KD + feature KD from the full model (losses.py), at logit-normal t
   and with the teacher's caption dropout, so the result is again a teacher: same sampler, steps and CFG.
4. Export a teacher checkpoint whose card records the lineage (``compression``: source sha256, kept and removed
   blocks, criterion, KD weights). Step-distil it like any teacher (`fewstep distill --teacher OUT/export`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fewstep.errors import UsageError
from fewstep.kernels.runtime import resolve_device
from fewstep.models.flow import interpolate, logit_normal_t
from fewstep.models.mmdit import MMDiT
from fewstep.models.pipeline import TextToImage
from fewstep.training import distributed
from fewstep.training.compress.importance import CRITERIA, Calibration, Ranking, block_names, rank_blocks
from fewstep.training.compress.losses import feature_kd, output_kd, task_loss
from fewstep.training.compress.prune import choose_blocks, parse_keep, prune, removal_count
from fewstep.training.data import sample_batch
from fewstep.training.distill.common import DataSource, DistillRecipe, is_flux
from fewstep.training.distill.config import DistillConfig
from fewstep.training.loop import train
from fewstep.training.teacher import drop_captions


class CompressLoss(nn.Module):
    """The student and its losses; the full model's outputs come in with the batch (it is not trained, so it
    is not part of what the loop optimises, averages and saves)."""

    def __init__(self, student: MMDiT, sources: list[int], weights: dict[str, float], norm: str):
        super().__init__()
        self.student, self.sources, self.weights, self.norm = student, sources, weights, norm

    def forward(self, x0, noise, t, cond, v_teacher=None, f_teacher=None, guidance=None):
        """``v_teacher``/``f_teacher`` None: no KD term has weight (the full model was not run)."""
        x_t = interpolate(x0, noise, t)
        v, feats = self.student(x_t, t, cond.tokens, cond.mask, cond.pooled, guidance, return_features=True)
        terms = {"task": task_loss(v, x0, noise)}
        if v_teacher is not None:
            terms["output_kd"] = output_kd(v, v_teacher)
            terms["feature_kd"] = feature_kd(feats, f_teacher, self.sources, self.norm)
        loss = sum(self.weights[k] * term for k, term in terms.items())
        return loss, {k: term.detach() for k, term in terms.items()}


class CompressRecipe(DistillRecipe):
    def __init__(
        self,
        cfg: DistillConfig,
        teacher: TextToImage,
        student: MMDiT,
        sources: list[int],
        lineage: dict,
        source: DataSource | None = None,
    ):
        super().__init__(cfg, teacher)
        s = cfg.compress
        self.source = source or DataSource(cfg, teacher)
        self.lineage = lineage
        self.module = CompressLoss(student, sources, lineage["weights"], s.feature_norm)

    def make_batch(self, generator: torch.Generator) -> dict[str, Any]:
        b = sample_batch(self.source.data, self.cfg.batch_size, generator)
        n = len(b.captions)
        return {
            "images": b.images,
            "captions": drop_captions(b.captions, self.cfg.compress.caption_dropout, generator),
            "t": logit_normal_t(n, generator),  # as the teacher was trained (SD3, minRF)
            "noise": torch.randn(n, *self.teacher.latent_shape, generator=generator),
        }

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        x0, noise, t, cond = batch["x0"], batch["noise"], batch["t"], batch["cond"]
        g = guidance_input(self.cfg, self.teacher, len(t), t.device)
        w = self.lineage["weights"]
        if not (w["output_kd"] or w["feature_kd"]):  # task loss only: the full model need not run
            return self.ctx.module(x0, noise, t, cond, guidance=g)
        with torch.no_grad():
            x_t = interpolate(x0, noise, t)
            tr = self.teacher.transformer
            v_t, f_t = tr(x_t, t, cond.tokens, cond.mask, cond.pooled, g, return_features=True)
        return self.ctx.module(x0, noise, t, cond, v_t, f_t, g)  # the DDP-wrapped module: gradients averaged

    def export(self, ema: nn.Module, out_dir: Path, info: dict[str, Any]) -> TextToImage:
        return export_compressed(self.teacher, ema.student, out_dir, self.cfg, info, self.lineage)


def guidance_input(cfg: DistillConfig, teacher: TextToImage, n: int, device: torch.device) -> torch.Tensor | None:
    """The scale a guidance-embedded teacher (FLUX.1-dev) and its compressed copy run at; None for a CFG teacher."""
    if not teacher.transformer.cfg.guidance_embed:
        return None
    w = teacher.sampling.guidance if cfg.compress.guidance is None else cfg.compress.guidance
    return torch.full((n,), float(w), device=device)


def export_compressed(
    teacher: TextToImage, transformer: MMDiT, out_dir: Path, cfg: DistillConfig, info: dict[str, Any], lineage: dict
) -> TextToImage:
    """A teacher checkpoint (the full model's text encoder, tokenizer, autoencoder and sampling) around the
    compressed transformer, its card carrying the lineage; for a Flux teacher a transformer checkpoint and a
    FluxPipeline folder (training/flux.py)."""
    if is_flux(teacher):
        card = {"name": cfg.name, "sampling": teacher.sampling.model_dump(), "data": {"name": cfg.data}}
        card.update(training={"method": "compress", **info}, compression=lineage)
        return teacher.export(transformer, out_dir, card, cfg.export_dtype)
    config = replace(teacher.config, transformer=transformer.cfg)
    model = TextToImage(config, teacher.tokenizer, teacher.text_encoder, transformer, teacher.autoencoder)
    model.to("cpu")
    sampling = teacher.sampling.model_dump()
    card = {
        "name": cfg.name,
        "role": "teacher",
        "sampling": sampling,
        "training": {"method": "compress", **info},
        "data": {"name": cfg.data},
        "compression": lineage,
    }
    model.save(out_dir, card, dtype=cfg.export_dtype, overwrite=True)
    teacher.to(teacher.device)  # export moved the shared modules to the CPU
    kept, total = len(lineage["kept"]), len(lineage["kept"]) + len(lineage["removed"])
    print(f"compressed model exported to {out_dir} ({kept} of {total} blocks)")
    return model


@torch.no_grad()
def calibration_batch(cfg: DistillConfig, teacher: TextToImage, source: DataSource) -> Calibration:
    """Real data, noised at times spread evenly over (0, 1) (fixed seed: the ranking is reproducible)."""
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    n = cfg.compress.calibration
    b = sample_batch(source.data, n, g)
    device = teacher.device
    x0 = source.latents(b.images, device)
    t = ((torch.arange(n) + 0.5) / n).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    g = guidance_input(cfg, teacher, n, device)
    return Calibration(interpolate(x0, noise, t), t, teacher.encode_text(b.captions), g)


def rank(cfg: DistillConfig, teacher: TextToImage, out: Path, source: DataSource) -> Ranking:
    """Rank the teacher's blocks by every criterion and write OUT/ranking.md and OUT/ranking.json."""
    ranking = rank_blocks(teacher.transformer.eval(), calibration_batch(cfg, teacher, source), CRITERIA)
    k = removal_count(ranking.blocks, cfg.compress.remove)
    if _rank0():  # every rank ranks (the same batch), one writes
        out.mkdir(parents=True, exist_ok=True)
        (out / "ranking.json").write_text(ranking.to_json())
        (out / "ranking.md").write_text(f"# Block importance of {teacher.name}\n\n" + ranking.to_markdown(max(1, k)))
    return ranking


def _rank0() -> bool:
    return distributed.rank() == 0


def check(cfg: DistillConfig, teacher: TextToImage) -> None:
    """Everything about the settings that can be wrong, before any data is read or any block is ranked."""
    s = cfg.compress
    if s.criterion not in CRITERIA:
        raise UsageError(f"compress.criterion: {s.criterion!r} is not one of {', '.join(CRITERIA)}")
    if s.feature_norm not in ("plain", "per_block"):
        raise UsageError(f"compress.feature_norm: {s.feature_norm!r} is not plain or per_block")
    if min(s.task_weight, s.output_weight, s.feature_weight) < 0:
        raise UsageError("compress: the loss weights must be >= 0")
    names = block_names(teacher.transformer)
    if s.keep:
        parse_keep(s.keep, names)
    elif s.remove is None and len(names) < 3:
        raise UsageError(f"{teacher.name} has {len(names)} blocks: too few to remove a third; pass --keep")


def run_compress(cfg: DistillConfig, out: Path, teacher: TextToImage) -> list[Path]:
    check(cfg, teacher)
    s = cfg.compress
    names = block_names(teacher.transformer)
    teacher.to(resolve_device(cfg.device, distributed.rank()))  # the device of the rank where it trains
    source = DataSource(cfg, teacher)  # read once: the calibration batch and the training batches
    ranking = rank(cfg, teacher, out, source)
    kept = choose_blocks(names, ranking, s.criterion, s.remove, s.keep)
    if dist.is_initialized():  # ranks could part ways on a near-tie: rank 0's choice is everyone's
        shared = [kept]
        dist.broadcast_object_list(shared, src=0)
        kept = shared[0]
    chosen = out / "compress.json"  # a resumed run must train the blocks its state.pt holds, whatever is asked now
    if chosen.exists():
        before = json.loads(chosen.read_text())["kept"]
        if before != kept:
            raise UsageError(
                f"{out} was started keeping {', '.join(before)}; these settings keep {', '.join(kept)}: use a new --out"
            )
    elif _rank0():
        out.mkdir(parents=True, exist_ok=True)
        chosen.write_text(json.dumps({"kept": kept}, indent=2))
    student, sources = prune(teacher.transformer, kept)
    lineage = {
        "source": {"name": teacher.name, "sha256": teacher.weights_sha256()},
        "criterion": "keep" if s.keep else s.criterion,
        "kept": kept,
        "removed": [n for n in names if n not in kept],
        "weights": {"task": s.task_weight, "output_kd": s.output_weight, "feature_kd": s.feature_weight},
        "feature_norm": s.feature_norm,
    }
    if _rank0():
        print(f"keeping {', '.join(kept)}; removing {', '.join(lineage['removed'])} ({lineage['criterion']})")
    student = student.train().requires_grad_(True)
    train(cfg, CompressRecipe(cfg, teacher, student, sources, lineage, source), out_dir=out)
    return [out / "export"]
