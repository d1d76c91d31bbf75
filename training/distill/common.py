"""What every distillation recipe shares: the frozen teacher, the student built from it, batches of
captions (and data latents), teacher targets with classifier-free guidance, and the student's export."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.errors import UsageError
from fewstep.models.flow import timesteps as make_timesteps
from fewstep.models.mmdit import MMDiT
from fewstep.models.pipeline import TextToImage
from fewstep.models.text import TextCond
from fewstep.training.data import load_data, sample_batch
from fewstep.training.distill.config import DistillConfig
from fewstep.training.recipe import Context, RecipeBase


def load_teacher(path: str | Path, device: str | torch.device = "cpu", resolution: int | None = None) -> TextToImage:
    """The frozen teacher: a text-to-image checkpoint (a student may teach the next round), or a diffusers Flux
    pipeline folder (training/flux.py: the same interface, its components Flux's)."""
    from fewstep.training.flux import FluxTeacher, is_pipeline_folder

    if is_pipeline_folder(path):
        return FluxTeacher(path, resolution, device)
    return TextToImage.load(path, device)


def is_flux(teacher: Any) -> bool:
    return bool(getattr(teacher, "is_flux", False))


def load_exported(teacher: TextToImage, directory: Path) -> MMDiT:
    """The transformer a run exported (a phase or round's student, to train on), at the teacher's default
    embedded scale where it runs at one (training/flux.py)."""
    from fewstep.models.convert import load_transformer

    if not is_flux(teacher):
        return TextToImage.load(directory).transformer
    tf = load_transformer(directory)
    tf.default_guidance = teacher.transformer.default_guidance
    return tf


def build_student(teacher: TextToImage, guidance_embed: bool = False) -> MMDiT:
    """A copy of the teacher's transformer (every method starts the student there).

    With ``guidance_embed`` the student gets a guidance-scale input (LCM, Flux-dev) whose output layer is
    zero-initialised, so the student starts exactly as the teacher.
    """
    src = teacher.transformer
    if not guidance_embed or src.cfg.guidance_embed:
        student = copy.deepcopy(src)
    else:
        student = MMDiT(replace(src.cfg, guidance_embed=True), src.txt_in.in_features, src.latent_size)
        missing, unexpected = student.load_state_dict(src.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("guidance_in.") for k in missing)
        nn.init.zeros_(student.guidance_in.out_layer.weight)
        nn.init.zeros_(student.guidance_in.out_layer.bias)
    if guidance_embed:
        student.default_guidance = None  # the recipe passes the scale it trains on (LCM's w)
    # fp32 master weights under bf16 autocast, whatever the frozen teacher's dtype (a Flux teacher is bf16 on GPUs)
    return student.float().train().requires_grad_(True)


def teacher_guidance(cfg: DistillConfig, teacher: TextToImage) -> float:
    """The CFG scale of the teacher's targets: the config's, else (None) the teacher card's default."""
    return teacher.sampling.guidance if cfg.teacher_guidance is None else cfg.teacher_guidance


class Conditioner:
    """Captions -> text conditions with the teacher's frozen text encoder; caches the empty caption."""

    def __init__(self, teacher: TextToImage):
        self.teacher = teacher
        self._empty: TextCond | None = None

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> TextCond:
        return self.teacher.encode_text(captions)

    @torch.no_grad()
    def empty(self, n: int) -> TextCond:
        if self._empty is None or self._empty.tokens.device != self.teacher.device:
            self._empty = self.teacher.encode_text([""])
        e = self._empty
        return TextCond(e.tokens.expand(n, -1, -1), e.mask.expand(n, -1), e.pooled.expand(n, -1))


def velocity(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: TextCond, guidance: torch.Tensor | None = None):
    return net(x, t, cond.tokens, cond.mask, cond.pooled, guidance=guidance)


@torch.no_grad()
def guided_velocity(
    net: MMDiT, x: torch.Tensor, t: torch.Tensor, cond: TextCond, empty: TextCond, w: torch.Tensor | float
) -> torch.Tensor:
    """Teacher velocity with CFG, v_u + w·(v_c − v_u); ``w`` may differ per sample (LCM's w ~ U[a, b]). A teacher
    that embeds the scale (FLUX.1-dev, a guidance-distilled model) takes w as its input in one pass instead."""
    if net.cfg.guidance_embed:
        g = torch.as_tensor(w, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        return velocity(net, x, t, cond, guidance=g)
    w = torch.as_tensor(w, device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    if bool((w == 1).all()):
        return velocity(net, x, t, cond)
    both = cond.cat(empty)
    v_c, v_u = net(torch.cat([x, x]), torch.cat([t, t]), both.tokens, both.mask, both.pooled).chunk(2)
    return v_u + w * (v_c - v_u)


class DataSource:
    """Captioned batches of the benchmark's training data, encoded to latents by the teacher's autoencoder."""

    def __init__(self, cfg: DistillConfig, teacher: TextToImage):
        self.cfg, self.teacher = cfg, teacher
        self.data = load_data(cfg.data, "train", teacher.sizes.width)
        if getattr(self.data, "images", None) is None:
            raise UsageError(
                f"--method {cfg.method} trains on noised images, and data {cfg.data!r} holds captions only: give an "
                "image-caption folder (folder:PATH); reflow and ladd learn from the teacher's samples (prompts:FILE)"
            )

    def draw(self, n: int, generator: torch.Generator) -> dict[str, Any]:
        b = sample_batch(self.data, n, generator)
        return {"images": b.images, "captions": b.captions}

    @torch.no_grad()
    def latents(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        ae = self.teacher.autoencoder
        images = images.to(device)
        return images if ae is None else ae.encode(images)


def prepare_common(batch: dict[str, Any], device: torch.device, cond: Conditioner, source: DataSource | None):
    """Move tensors to the device, encode captions and (if present) images."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k == "captions":
            out["cond"] = cond(v)
        elif k == "images" and source is not None:
            out["x0"] = source.latents(v, device)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out


class DistillRecipe(RecipeBase):
    """A recipe over a frozen teacher: moves it to the run's device, encodes captions (and data images, when
    ``source`` is set) with it. Subclasses set ``module`` (the student, or a loss module around it)."""

    source: DataSource | None = None

    def __init__(self, cfg: DistillConfig, teacher: TextToImage):
        self.cfg, self.teacher = cfg, teacher
        self.cond = Conditioner(teacher)

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.teacher.to(ctx.device)

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        return prepare_common(batch, device, self.cond, self.source)


def export_student(
    teacher: TextToImage,
    transformer: MMDiT,
    out_dir: Path,
    cfg: DistillConfig,
    info: dict[str, Any],
    steps: list[int],
    sampler: str = "euler",
    parameterization: str = "velocity",
    guidance: float = 1.0,
    grids: dict[int, list[float]] | None = None,
    extra: dict[str, Any] | None = None,
    consistency: tuple[float, float] | None = None,
) -> TextToImage:
    """Write a student checkpoint: the student's transformer with the teacher's text encoder, tokenizer and
    autoencoder, and a card naming the method, its settings, step counts and the teacher.

    ``info`` is what the loop reports (steps, duration, the loop's and the method's settings); ``extra`` adds
    values the recipe resolved (the teacher's CFG scale it used, the Huber constant, ...); ``consistency`` is
    (sigma_data, boundary_scale) for a consistency-parameterised student."""
    grids = grids or {s: make_timesteps(s) for s in steps}
    card = {
        "name": cfg.name,
        "role": "student",
        "parameterization": parameterization,
        "sampling": {
            "default_steps": min(steps),
            "sampler": sampler,
            "any_steps": False,
            "guidance": guidance,
            "timesteps": {str(s): grids[s] for s in steps},
            "max_steps": max(steps),
        },
        "teacher": {"name": teacher.name, "sha256": teacher.weights_sha256()},
        "training": {"method": cfg.method, **info, **({"resolved": extra} if extra else {})},
        "data": {"name": cfg.data, "teacher_generated": cfg.method in ("reflow", "ladd")},
    }
    if consistency is not None:
        card["sampling"].update(sigma_data=consistency[0], boundary_scale=consistency[1])
    if is_flux(teacher):  # a transformer checkpoint and a FluxPipeline folder (training/flux.py)
        return teacher.export(transformer, out_dir, card, cfg.export_dtype)
    config = replace(teacher.config, transformer=transformer.cfg)
    student = TextToImage(config, teacher.tokenizer, teacher.text_encoder, transformer, teacher.autoencoder)
    student.to("cpu")
    student.save(out_dir, card, dtype=cfg.export_dtype, overwrite=True)
    teacher.to(teacher.device)  # export moved the shared modules to the CPU
    print(f"student exported to {out_dir} (steps {steps})")
    return student
