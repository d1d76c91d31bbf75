"""A diffusers Flux pipeline folder as the teacher of every recipe, and its students exported both ways.

The recipes ask a teacher for little: its transformer (an MMDiT), text conditions for captions, latents of
images, its time grid at k steps, (guided) velocities, a name and an identity of its weights. ``FluxTeacher``
answers those from a FluxPipeline folder (FLUX.1-dev, -schnell, or a tiny one saved by a test):

- the transformer converted exactly to fewstep's MMDiT (models/flux.py), so every recipe, block ranking and
  feature hook works on it unchanged;
- CLIP + T5 through the pipeline's own ``encode_prompt``, each distinct caption encoded once and cached (in
  memory, and in OUT/text-embeddings.safetensors when a run asks: ``precompute``), after which the text encoders
  leave the accelerator — T5-XXL alone is 9.5 GB in bf16;
- the VAE's latents normalised with its shift and scale, as FluxPipeline denormalises them;
- the scheduler's own shifted sigmas at the training resolution (FluxPipeline's dynamic shift μ from the image's
  token count), so a student trained on those grids is served by FluxPipeline at the same step counts.

A student (or a compressed teacher) of a Flux teacher is exported as a fewstep checkpoint of role
"transformer" (its card carries the sampling grids, the teacher and the lineage) and beside it, in
``DIR-diffusers``, as a FluxPipeline folder — the teacher's components hard-linked, the new transformer, and a
``fewstep.json`` — that ``fewstep serve`` serves and ``FluxTransformer2DModel.from_pretrained`` loads.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from fewstep.errors import UsageError
from fewstep.models.checkpoint import DTYPES, Card, Sampling, save_checkpoint
from fewstep.models.flux import describe, mmdit_state_from_folder, write_diffusers_transformer
from fewstep.models.mmdit import MMDiT
from fewstep.models.sizes import Sizes
from fewstep.models.text import TextCond
from fewstep.training.distributed import rank

CACHE_FILE = "text-embeddings.safetensors"


def is_pipeline_folder(path: str | Path) -> bool:
    """A diffusers pipeline folder (what ``save_pretrained`` writes): one with a model_index.json."""
    return (Path(path) / "model_index.json").is_file()


class FluxAutoencoder:
    """The pipeline's VAE with Flux's latent normalisation: z = (E(x) − shift)·scale, and back."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f); the posterior's mean, so a batch encodes the same each time."""
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return ((dist.mean - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((latents / self.scale + self.shift).to(self.vae.dtype)).sample.float()


class FluxTeacher:
    """A FluxPipeline folder in the seat of a fewstep TextToImage teacher (see the module docstring)."""

    is_flux = True
    card = None  # no fewstep card: the folder's fewstep.json (if any) names it

    def __init__(self, folder: str | Path, resolution: int | None = None, device: str | torch.device = "cpu"):
        from diffusers import FluxPipeline

        from fewstep.models.diffusers_model import DTYPES, INDEX, _load_component, read_spec
        from fewstep.models.flux_adapter import FluxMMDiT

        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX).read_text())
        if index.get("_class_name") != "FluxPipeline":
            raise UsageError(f"{self.folder / INDEX}: a {index.get('_class_name')!r}; Flux teachers are FluxPipeline")
        self.spec = read_spec(self.folder) if (self.folder / "fewstep.json").is_file() else None
        device = torch.device(device)
        # frozen networks in bf16 on an accelerator (a 12B teacher), fp32 on the CPU (no bf16 matmuls worth having)
        dtype = DTYPES.get(self.spec.dtype if self.spec else "auto") or (
            torch.bfloat16 if device.type == "cuda" else torch.float32
        )
        cfg, state = mmdit_state_from_folder(self.folder)
        self.transformer = MMDiT.from_state(cfg, state).to(dtype=dtype).eval().requires_grad_(False)
        if cfg.guidance_embed:  # FLUX.1-dev: a recipe that does not vary the scale runs it at the default
            self.transformer.default_guidance = self.sampling_guidance()
        parts = {  # FluxPipeline's optional image encoder / feature extractor are saved as [null, null]
            name: None if lib is None else _load_component(lib, klass, self.folder / name, dtype)
            for name, entry in index.items()
            if not name.startswith("_") and name != "transformer" and isinstance(entry, list) and len(entry) == 2
            for lib, klass in [entry]
        }
        self.pipe = FluxPipeline(transformer=FluxMMDiT(self.transformer), **parts)
        self.pipe.set_progress_bar_config(disable=True)
        self.autoencoder = FluxAutoencoder(self.pipe.vae)
        self.factor = self.pipe.vae_scale_factor  # pixels per latent (8 for FLUX.1), the MMDiT packs 2×2 more
        side = resolution or (self.spec.width if self.spec else 512)
        if side % (2 * self.factor):
            raise UsageError(f"resolution {side}: a Flux image side must be a multiple of {2 * self.factor}")
        self.resolution = side
        self.max_sequence_length = (self.spec.max_sequence_length if self.spec else None) or 512
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._grids: dict[int, list[float]] = {}
        self._encoders_offloaded = False
        self.to(device)

    # ---- what the recipes ask of a teacher (the same as TextToImage) ---------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name if self.spec else self.folder.name

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.factor
        return (self.pipe.vae.config.latent_channels, side, side)

    @property
    def sizes(self) -> Sizes:
        return Sizes.fixed(self.resolution, self.resolution)

    def sampling_guidance(self) -> float:
        """FLUX.1-dev's embedded scale (fewstep.json, else 3.5); for a CFG teacher its CFG scale, where 0 (what a
        schnell fewstep.json says: no guidance) means 1, one conditional pass."""
        if self.transformer.cfg.guidance_embed:
            return self.spec.guidance if self.spec else 3.5
        return max(1.0, self.spec.guidance) if self.spec else 1.0

    @property
    def sampling(self) -> Sampling:
        """The default steps and guidance of the folder's fewstep.json (FLUX.1-dev: 28 steps, guidance 3.5)."""
        steps = self.spec.default_steps if self.spec else 28
        guidance = self.sampling_guidance()
        max_steps = self.spec.max_steps if self.spec else 50
        return Sampling(
            default_steps=steps, any_steps=True, timesteps={str(steps): self.grid(steps)},
            guidance=guidance, max_steps=max_steps,
        )  # fmt: skip

    def grid(self, steps: int) -> list[float]:
        """FluxPipeline's sigmas for ``steps`` at the training resolution (served_grid): the teacher's data and
        targets are sampled on the schedule it is served with."""
        if steps not in self._grids:  # read from the folder's scheduler once per step count
            self._grids[steps] = served_grid(self.folder, steps, self.resolution)
        return self._grids[steps]

    def supports(self, steps: int) -> bool:
        return 1 <= steps <= self.sampling.max_steps

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> TextCond:
        """T5 tokens and CLIP pooled vectors; each distinct prompt is encoded once (then read from the cache)."""
        prompts = list(prompts)
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            self._encode(missing)
        tokens = torch.stack([self._cache[p][0] for p in prompts]).to(self.device)
        pooled = torch.stack([self._cache[p][1] for p in prompts]).to(self.device)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=self.device)  # Flux attends to every token
        dtype = self.transformer.img_in.weight.dtype
        return TextCond(tokens.to(dtype), mask, pooled.to(dtype))

    def _encode(self, prompts: list[str], batch_size: int = 64) -> None:
        device = self.pipe.text_encoder.device  # the CPU once precompute offloaded them
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo : lo + batch_size]
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=chunk, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
            )
            for p, e, q in zip(chunk, embeds.cpu(), pooled.cpu(), strict=True):
                self._cache[p] = (e, q)

    def precompute(self, captions: Sequence[str], out: Path | None) -> None:
        """Encode every distinct caption a run will draw, once; keep them in ``out``/text-embeddings.safetensors (a
        resumed or repeated run reads them back), then move the text encoders off the accelerator."""
        unique = sorted(set(captions))
        path = out / CACHE_FILE if out is not None else None
        key = json.dumps({"encoders": self._encoder_id(), "max_sequence_length": self.max_sequence_length})
        if path is not None and path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") == key:
                names = json.loads(meta["prompts"])
                tensors = load_file(str(path))
                for i, p in enumerate(names):
                    self._cache[p] = (tensors[f"t{i}"], tensors[f"p{i}"])
        todo = [p for p in unique if p not in self._cache]
        for lo in tqdm(range(0, len(todo), 64), desc="text embeddings (CLIP + T5, once)", unit="batch"):
            self._encode(todo[lo : lo + 64])
        if path is not None and todo and rank() == 0:  # under torchrun every rank encodes, rank 0 keeps the file
            names = sorted(self._cache)
            tensors = {}
            for i, p in enumerate(names):
                tensors[f"t{i}"], tensors[f"p{i}"] = (x.contiguous() for x in self._cache[p])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            save_file(tensors, str(tmp), metadata={"key": key, "prompts": json.dumps(names)})
            os.replace(tmp, path)  # a crash leaves a .part, never a truncated cache under the real name
        if self.device.type != "cpu":
            for enc in (self.pipe.text_encoder, self.pipe.text_encoder_2):
                enc.to("cpu")  # prompts outside the set still encode, on the CPU
            self._encoders_offloaded = True

    def _encoder_id(self) -> str:
        from fewstep.models.diffusers_model import component_id

        return "|".join(component_id(self.folder / n) for n in ("text_encoder", "text_encoder_2"))

    def velocity_fn(self, cond: TextCond, guidance: float):
        from fewstep.models.pipeline import TextToImage

        return TextToImage.velocity_fn(self, cond, guidance)  # the same rule: embedded guidance, or CFG

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)

    def to(self, device: str | torch.device) -> FluxTeacher:
        device = torch.device(device)
        self.transformer.to(device)
        self.pipe.vae.to(device)
        if not self._encoders_offloaded:
            self.pipe.text_encoder.to(device)
            self.pipe.text_encoder_2.to(device)
        return self

    def weights_sha256(self) -> str:
        """Identity of the teacher: sha256 over its transformer folder's files."""
        from fewstep.models.diffusers_model import component_id

        if not hasattr(self, "_sha"):
            self._sha = component_id(self.folder / "transformer")
        return self._sha

    # ---- exports -------------------------------------------------------------------------------------------
    def export(
        self,
        transformer: MMDiT,
        out_dir: Path,
        card: dict[str, Any],
        dtype: str,
    ) -> Card:
        """Write ``transformer`` as a fewstep checkpoint (role "transformer", ``card``'s sampling, teacher and
        lineage) at ``out_dir`` and as a FluxPipeline folder at ``out_dir``-diffusers (see pipeline_folder)."""
        module = copy.deepcopy(transformer).to("cpu").float()
        if module.default_guidance is not None and card.get("sampling"):  # the embedded scale it was trained at
            card = {**card, "sampling": {**card["sampling"], "guidance": module.default_guidance}}
        saved = save_checkpoint(
            out_dir,
            {**card, "role": "transformer", "model": {"transformer": describe(module.cfg)}},
            {"transformer.safetensors": module},
            dtype=dtype,
            overwrite=True,
        )
        folder = out_dir.with_name(out_dir.name + "-diffusers")
        self.pipeline_folder(module, folder, saved, DTYPES[dtype])
        print(f"exported {out_dir} (fewstep) and {folder} (diffusers FluxPipeline)")
        return saved

    def pipeline_folder(self, module: MMDiT, out: Path, card: Card, dtype: torch.dtype = torch.float32) -> Path:
        """A FluxPipeline folder for ``module``: the teacher's other components hard-linked (copied across file
        systems), the transformer written by diffusers, a fewstep.json, and for a student a scheduler that gives
        FluxPipeline the student's own grids, checked against the card: the teacher's (a guidance-distilled model
        at the teacher's steps) keep its scheduler; the uniform grids most recipes train on (t = i/k) turn shifting
        off (shift 1, no dynamic shift: FluxPipeline's linspace(1, 1/k) then 0); an
        x0-sampling student's scheduler re-noises (``stochastic_sampling``: x0 = x − σ·v, then (1 − σ')·x0 + σ'·ε,
        its sampler; the noise comes from torch's global generator, not the request's seed)."""
        staging = out.parent / f".{out.name}.new"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        for item in self.folder.iterdir():
            if item.name in ("transformer", "fewstep.json") or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, staging / item.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(item, staging / item.name)
        state = {k: v.to(dtype) for k, v in module.state_dict().items()}
        write_diffusers_transformer(staging / "transformer", module.cfg, state, overwrite=True)
        s = card.sampling or self.sampling
        student = not s.any_steps
        if student:
            # the teacher's shifted grids (a guidance-distilled model at its teacher's steps) or the uniform ones
            shifted = all(_close(self.grid(k), s.timesteps[str(k)]) for k in s.supported_steps())
            sched = staging / "scheduler" / "scheduler_config.json"
            config = json.loads(sched.read_text())
            if not shifted:
                config.update(use_dynamic_shifting=False, shift=1.0)
            config.update(stochastic_sampling=s.sampler == "x0")
            sched.unlink()  # a hard link: never write through it into the teacher's folder
            sched.write_text(json.dumps(config, indent=2))
            for k in s.supported_steps():
                served = served_grid(staging, k, self.resolution)
                if not _close(served, s.timesteps[str(k)]):
                    raise ValueError(f"{card.name}: FluxPipeline would sample {k} steps at {served}, not its grid")
        spec: dict[str, Any] = {
            "name": card.name,
            "role": "student" if student else "teacher",
            "default_steps": s.default_steps,
            "max_steps": max(s.supported_steps()) if student else s.max_steps,
            # FluxPipeline hands guidance_scale to a guidance-embedded transformer only (CFG distilled in: none); a
            # student trained at one embedded scale (default_guidance) is served at it
            "guidance": (module.default_guidance or s.guidance) if module.cfg.guidance_embed else 0.0,
            "width": self.resolution,
            "height": self.resolution,
            "min_side": min(self.spec.min_side if self.spec else 256, self.resolution),
            "max_side": max(self.spec.max_side if self.spec else 2048, self.resolution),
        }
        if self.spec and self.spec.max_sequence_length:
            spec["max_sequence_length"] = self.spec.max_sequence_length
        if student:  # a student that embeds the scale takes it from a request (LCM's w, FLUX.1-dev's guidance)
            w_input = module.cfg.guidance_embed and module.default_guidance is None
            spec.update(teacher=self.name, supported_steps=s.supported_steps(), guidance_input=w_input)
        (staging / "fewstep.json").write_text(json.dumps(spec, indent=2) + "\n")
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.rename(out, old)
        os.rename(staging, out)  # the folder appears whole or not at all
        if old.exists():
            shutil.rmtree(old)
        return out


def served_grid(folder: Path, steps: int, resolution: int) -> list[float]:
    """The sigmas FluxPipeline samples ``steps`` with from ``folder``'s scheduler at ``resolution``: its
    linspace(1, 1/steps), shifted by μ of the image's token count where the scheduler shifts dynamically, then 0."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    vae = json.loads((folder / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    c = sched.config
    tokens = (resolution // (2 * factor)) ** 2
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu, device="cpu")
    return [float(x) for x in sched.sigmas]


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
