"""diffusers pipeline folders as served models: FLUX.1-schnell with FLUX.1-dev behind it, SDXL-Turbo, Sana-Sprint.

A folder with a ``model_index.json`` (what ``save_pretrained`` writes, what a hub download holds) is served when
it also carries a ``fewstep.json`` (``PipelineSpec``: name, role, teacher, step counts, guidance, sizes; the keys
are in docs/checkpoints.md). A Flux pipeline runs its transformer as fewstep's MMDiT (models/flux_adapter.py)
with transformers' CLIP and T5 and diffusers' VAE and scheduler; any other text-to-image pipeline runs as
diffusers builds it.

Components whose files are identical (same sha256 over the folder: FLUX.1-schnell and -dev share CLIP, T5 and
the VAE) are loaded once and held by every pipeline that names them (``SharedComponents``). Noise is drawn per
image from ``torch.Generator("cpu").manual_seed(seed)``, as a user calling the pipeline would, so an image does
not depend on its batch and equals what ``Pipeline.from_pretrained(folder)(..., generator=...)`` returns.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fewstep.errors import UsageError
from fewstep.models.sizes import Sizes

log = logging.getLogger("fewstep.models")
SPEC, INDEX = "fewstep.json", "model_index.json"
DENOISERS = ("transformer", "unet", "prior")  # a pipeline's own network: never shared
LIBRARIES = ("diffusers", "transformers")  # model_index.json may name classes from these only
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class PipelineSpec(BaseModel):
    """``fewstep.json``: how fewstep serves a diffusers pipeline folder (docs/checkpoints.md)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    role: Literal["student", "teacher"]
    teacher: str | None = None  # a student's fallback: the name of a teacher in the same models folder
    supported_steps: list[int] | None = None  # a student's served step counts
    default_steps: int = Field(ge=1)
    max_steps: int = Field(default=50, ge=1)  # a teacher runs 1..max_steps
    guidance: float = Field(default=0.0, ge=0)  # the default guidance scale (FLUX.1-dev 3.5; schnell, Turbo 0)
    # a student that takes the scale as an input; false (guidance distilled in): a request for another scale is a
    # 400 rather than guidance applied twice. Teachers always take one.
    guidance_input: bool = False
    width: int = Field(default=1024, ge=1)  # the default size
    height: int = Field(default=1024, ge=1)
    min_side: int = Field(default=256, ge=1)
    max_side: int = Field(default=2048, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    size_multiple: int | None = Field(default=None, ge=1)  # None: the pipeline's (Flux: VAE factor × 2)
    max_sequence_length: int | None = Field(default=None, ge=1, le=512)  # Flux's T5 tokens (schnell ≤ 256)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bfloat16 on CUDA, float32 else
    runner: Literal["auto", "fewstep", "diffusers"] = "auto"  # auto: Flux on fewstep's MMDiT, others diffusers

    @model_validator(mode="after")
    def _consistent(self) -> PipelineSpec:
        if self.role == "student":
            if not self.supported_steps:
                raise ValueError("a student needs supported_steps, the step counts it serves")
            if any(s < 1 for s in self.supported_steps):
                raise ValueError("supported_steps must be positive")
            if self.default_steps not in self.supported_steps:
                raise ValueError(f"default_steps {self.default_steps} is not in supported_steps")
        elif self.supported_steps is not None or self.teacher is not None:
            raise ValueError("a teacher has no supported_steps or teacher (it runs 1..max_steps)")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps {self.default_steps} exceeds max_steps {self.max_steps}")
        if not self.min_side <= min(self.width, self.height) <= max(self.width, self.height) <= self.max_side:
            raise ValueError(f"the default size {self.width}x{self.height} is outside min_side..max_side")
        return self


def read_spec(folder: Path) -> PipelineSpec:
    path = folder / SPEC
    try:
        return PipelineSpec.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise UsageError(f"{path}: missing (a pipeline folder is served when it carries a {SPEC})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or SPEC
        raise UsageError(f"{path}: {where}: {first['msg']}") from None


def component_id(folder: Path) -> str:
    """sha256 over a component folder's files (names and contents): equal ids, interchangeable components."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def module_bytes(obj: Any) -> int:
    if not isinstance(obj, torch.nn.Module):
        return 0
    return sum(t.numel() * t.element_size() for t in [*obj.parameters(), *obj.buffers()])


@dataclass
class SharedComponents:
    """Components loaded once by content id, across every pipeline a server loads."""

    loaded: dict[str, tuple[Any, str]] = field(default_factory=dict)  # id -> (object, the model that loaded it)
    bytes_saved: int = 0


@dataclass
class DiffusersModel:
    spec: PipelineSpec
    folder: Path
    pipe: Any
    runner: str  # "fewstep" | "diffusers"
    sizes: Sizes
    ids: dict[str, str]  # component -> content id
    shared: dict[str, str] = field(default_factory=dict)  # component -> the model whose copy it uses
    bytes_shared: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_flux(self) -> bool:
        return type(self.pipe).__name__ == "FluxPipeline"

    @property
    def kernels(self) -> str:
        return self.pipe.transformer.mmdit.kernels if self.runner == "fewstep" else "diffusers"

    @property
    def max_sequence_length(self) -> int:
        return self.spec.max_sequence_length or 512

    @property
    def encoder_key(self) -> tuple | None:
        """Two models with equal keys encode a prompt identically (the teacher reuses the student's encoding)."""
        if not self.is_flux:
            return None
        names = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        return (*(self.ids.get(n) for n in names), self.max_sequence_length, str(self.pipe.text_encoder.dtype))

    @classmethod
    def load(
        cls,
        folder: str | Path,
        device: torch.device,
        kernels: str = "auto",
        shared: SharedComponents | None = None,
        spec: PipelineSpec | None = None,
    ) -> DiffusersModel:
        """Raises UsageError naming the file when the folder cannot be served."""
        import diffusers

        folder = Path(folder)
        spec = spec or read_spec(folder)
        shared = shared if shared is not None else SharedComponents()
        try:
            index = json.loads((folder / INDEX).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{folder / INDEX}: cannot read it ({e})") from None
        class_name = index.get("_class_name", "")
        pipe_cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
        if pipe_cls is None or not isinstance(pipe_cls, type) or not issubclass(pipe_cls, diffusers.DiffusionPipeline):
            raise UsageError(f"{folder / INDEX}: _class_name {class_name!r} is not a diffusers pipeline")
        flux = class_name == "FluxPipeline"
        if spec.runner == "fewstep" and not flux:
            raise UsageError(f"{folder / SPEC}: runner 'fewstep' runs Flux pipelines only, this is {class_name}")
        runner = "fewstep" if flux and spec.runner != "diffusers" else "diffusers"
        dtype = DTYPES.get(spec.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)

        accepted = set(inspect.signature(pipe_cls.__init__).parameters)
        components: dict[str, Any] = {}
        ids: dict[str, str] = {}
        reused: dict[str, str] = {}
        fresh: dict[str, Any] = {}
        saved = 0
        for name, entry in index.items():
            if name.startswith("_"):
                continue
            if not (isinstance(entry, list) and len(entry) == 2):
                if name in accepted:  # the pipeline's own config (SDXL's force_zeros_for_empty_prompt)
                    components[name] = entry
                continue
            lib, klass = entry
            if lib is None or klass is None:
                components[name] = None
                continue
            sub = folder / name
            if runner == "fewstep" and name == "transformer":
                components[name] = _fewstep_transformer(sub, device, dtype, kernels)
                continue
            if name in DENOISERS or "scheduler" in name:  # schedulers hold per-call state: one each
                components[name] = _load_component(lib, klass, sub, dtype)
                continue
            ids[name] = component_id(sub)
            key = f"{ids[name]}:{lib}.{klass}:{dtype}"  # the same files as another class are not the same object
            if key in shared.loaded:
                obj, owner = shared.loaded[key]
                reused[name] = owner
                saved += module_bytes(obj)
            else:
                obj = _load_component(lib, klass, sub, dtype)
                fresh[key] = obj
            components[name] = obj
        try:
            pipe = pipe_cls(**components)
        except TypeError as e:
            raise UsageError(f"{folder / INDEX}: {class_name} cannot be built from its components ({e})") from None
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        # offered for sharing only once the whole pipeline loaded: a folder that fails holds nothing in memory
        shared.loaded.update({key: (obj, spec.name) for key, obj in fresh.items()})
        shared.bytes_saved += saved
        factor = getattr(pipe, "vae_scale_factor", 8) * (2 if flux else 1)
        sizes = Sizes(
            spec.width, spec.height, spec.size_multiple or factor, spec.min_side, spec.max_side, spec.max_pixels
        )
        if sizes.error(spec.width, spec.height):
            raise UsageError(f"{folder / SPEC}: the default size: {sizes.error(spec.width, spec.height)[1]}")
        if reused:
            log.info("%s shares %s (%.1f MB not loaded twice)", spec.name, reused, saved / 2**20)
        return cls(spec, folder, pipe, runner, sizes, ids, reused, saved)

    # ---- what the engine calls (the same as TextToImage) ----------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Flux: (T5 tokens, CLIP pooled) for ``prompts``, reusable by a model with the same encoder_key."""
        if not self.is_flux:
            return None
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self.pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int | None = None,
        guidance: float | None = None,
        size: tuple[int, int] | None = None,
        cond: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """-> (B, 3, H, W) in [-1, 1]; image i from ``torch.Generator("cpu").manual_seed(seeds[i])``."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        width, height = size or (self.sizes.width, self.sizes.height)
        kwargs: dict[str, Any] = dict(
            num_inference_steps=steps or self.spec.default_steps,
            guidance_scale=self.spec.guidance if guidance is None else guidance,
            width=width,
            height=height,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
            output_type="pt",
        )
        if self.is_flux:
            kwargs["max_sequence_length"] = self.max_sequence_length
        if cond is not None:
            kwargs["prompt_embeds"], kwargs["pooled_prompt_embeds"] = cond
        else:
            kwargs["prompt"] = list(prompts)
        images = self.pipe(**kwargs).images  # (B, 3, H, W) in [0, 1]
        return images.float() * 2 - 1


def _load_component(lib: str, klass: str, folder: Path, dtype: torch.dtype) -> Any:
    if lib not in LIBRARIES:
        raise UsageError(f"{folder}: library {lib!r} is not one of {LIBRARIES}")
    loader = getattr(importlib.import_module(lib), klass, None)
    if loader is None or not hasattr(loader, "from_pretrained"):
        raise UsageError(f"{folder}: {lib} has no loadable class {klass!r}")
    kwargs = {"torch_dtype": dtype} if isinstance(loader, type) and issubclass(loader, torch.nn.Module) else {}
    try:
        obj = loader.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"{folder}: cannot load {klass} ({type(e).__name__}: {str(e)[:300]})") from None
    return obj.eval().requires_grad_(False) if isinstance(obj, torch.nn.Module) else obj


def _fewstep_transformer(folder: Path, device: torch.device, dtype: torch.dtype, kernels: str):
    from fewstep.kernels.runtime import resolve
    from fewstep.models.flux import mmdit_state_from_folder
    from fewstep.models.flux_adapter import FluxMMDiT
    from fewstep.models.mmdit import MMDiT

    mmdit = MMDiT.from_state(*mmdit_state_from_folder(folder))
    mmdit = mmdit.to(device=device, dtype=dtype).eval().requires_grad_(False)
    mmdit.set_kernels(resolve(kernels, device))
    return FluxMMDiT(mmdit).eval()
