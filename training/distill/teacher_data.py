"""Data that the teacher generates before training: (noise, ODE sample) latent pairs for reflow, the
synthetic training images of LADD, and the states of the teacher's guided ODE trajectories (guidance
distillation, trained on the states its sampler visits).

They are cached as safetensors beside the run, under a name derived from everything that determines them:
the teacher's weights (sha256), its step count and CFG scale, the seed, the caption data and n. Changing any
one of them writes a new file; a resumed or repeated run with the same key reads the old one instead of paying
for it twice. The key is stored in the file and checked on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from fewstep.models.pipeline import TextToImage
from fewstep.models.sampling import sample_euler
from fewstep.training.data import load_data, sample_batch
from fewstep.training.distill.common import Conditioner, guided_velocity

FORMAT = 1


class _CacheKey:
    """A frozen dataclass of everything that determines a cached file; ``PREFIX`` names its kind."""

    PREFIX: ClassVar[str]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def path(self, directory: Path) -> Path:
        return directory / f"{self.PREFIX}-{self.digest()}.safetensors"


@dataclass(frozen=True)
class SampleKey(_CacheKey):
    """Everything that determines a set of teacher samples."""

    PREFIX: ClassVar[str] = "teacher-samples"

    teacher_sha256: str
    steps: int
    guidance: float
    seed: int
    data: str
    n: int
    latent_shape: tuple[int, ...] = ()  # a Flux teacher's depends on the training resolution
    format: int = FORMAT


@dataclass
class TeacherSamples:
    noise: torch.Tensor  # (n, C, H, W): the starting noise z
    latents: torch.Tensor  # (n, C, H, W): the teacher's ODE solution from z
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def draw(self, n: int, generator: torch.Generator) -> dict:
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return {"z": self.noise[idx], "x": self.latents[idx], "captions": [self.captions[i] for i in idx]}


def teacher_samples(
    teacher: TextToImage,
    n: int,
    steps: int,
    guidance: float,
    directory: Path,
    data: str = "digits",
    seed: int = 0,
    batch_size: int = 128,
) -> TeacherSamples:
    """n (noise, teacher sample) latent pairs for captions drawn like the training data; cached by key."""
    key = SampleKey(teacher.weights_sha256(), steps, float(guidance), seed, data, n, tuple(teacher.latent_shape))
    path = key.path(directory)
    if path.exists():
        cached = _read(path, key)
        if cached is not None:
            return cached
    g = torch.Generator().manual_seed(seed)
    captions = sample_batch(load_data(data, "train"), n, g).captions
    noise = torch.randn(n, *teacher.latent_shape, generator=g)
    grid = teacher.grid(steps)
    out = []
    for lo in tqdm(range(0, n, batch_size), desc=f"teacher samples ({steps} steps)", unit="batch"):
        z = noise[lo : lo + batch_size].to(teacher.device)
        fn = teacher.velocity_fn(teacher.encode_text(captions[lo : lo + batch_size]), guidance)
        out.append(sample_euler(fn, z, grid).cpu())
    samples = TeacherSamples(noise, torch.cat(out), captions)
    _write(path, {"noise": samples.noise, "latents": samples.latents}, key, captions)
    return samples


@dataclass(frozen=True)
class TrajectoryKey(_CacheKey):
    """Everything that determines a set of guided teacher trajectories."""

    PREFIX: ClassVar[str] = "teacher-trajectories"

    teacher_sha256: str
    steps: int
    guidance_min: float
    guidance_max: float
    seed: int
    data: str
    n: int
    latent_shape: tuple[int, ...] = ()
    grid: tuple[float, ...] = ()  # the sampler's times: a schedule change makes other states
    format: int = FORMAT


@dataclass
class Trajectories:
    """The states x(t_k) of n Euler solutions of the teacher's guided ODE, each at its own scale w."""

    states: torch.Tensor  # (n, steps, C, H, W): x at grid[k] for k < steps (the points the sampler evaluates)
    w: torch.Tensor  # (n,) the CFG scale each trajectory was sampled at
    grid: torch.Tensor  # (steps + 1,) from 1 to 0
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def draw(self, n: int, generator: torch.Generator) -> dict:
        """n states (trajectory and step drawn uniformly) with their time, scale and caption."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        k = torch.randint(0, self.states.shape[1], (n,), generator=generator)
        return {
            "x_t": self.states[idx, k],
            "t": self.grid[k],
            "w": self.w[idx],
            "captions": [self.captions[i] for i in idx],
        }


@torch.no_grad()
def guided_trajectories(
    teacher: TextToImage,
    n: int,
    steps: int,
    guidance: tuple[float, float],
    directory: Path,
    data: str = "digits",
    seed: int = 0,
    batch_size: int = 128,
) -> Trajectories:
    """n trajectories of the teacher's CFG sampler at ``steps`` steps, w ~ U[guidance], captions drawn like the
    training data; every state kept (cached by key, as ``teacher_samples``)."""
    lo_w, hi_w = (float(g) for g in guidance)
    times = tuple(float(t) for t in teacher.grid(steps))
    key = TrajectoryKey(teacher.weights_sha256(), steps, lo_w, hi_w, seed, data, n, tuple(teacher.latent_shape), times)
    path = key.path(directory)
    grid = torch.tensor(teacher.grid(steps), dtype=torch.float32)
    if path.exists():
        cached = _cached(path, key)
        if cached is not None:
            tensors, captions = cached
            return Trajectories(tensors["states"], tensors["w"], grid, captions)
    g = torch.Generator().manual_seed(seed)
    captions = sample_batch(load_data(data, "train"), n, g).captions
    noise = torch.randn(n, *teacher.latent_shape, generator=g)
    w = lo_w + (hi_w - lo_w) * torch.rand(n, generator=g)
    states = torch.empty(n, steps, *teacher.latent_shape)
    conditioner = Conditioner(teacher)
    for lo in tqdm(range(0, n, batch_size), desc=f"teacher trajectories ({steps} steps)", unit="batch"):
        x = noise[lo : lo + batch_size].to(teacher.device)
        b = x.shape[0]
        cond = teacher.encode_text(captions[lo : lo + batch_size])
        empties = conditioner.empty(b)
        wb = w[lo : lo + b].to(teacher.device)
        for k in range(steps):
            states[lo : lo + b, k] = x.cpu()
            t = torch.full((b,), float(grid[k]), device=teacher.device)
            x = x + float(grid[k + 1] - grid[k]) * guided_velocity(teacher.transformer, x, t, cond, empties, wb)
    _write(path, {"states": states, "w": w}, key, captions)
    return Trajectories(states, w, grid, captions)


def _write(path: Path, tensors: dict[str, torch.Tensor], key, captions: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.part")  # one per process: the ranks of a parallel run all write
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(tmp),
        metadata={"key": json.dumps(asdict(key), sort_keys=True), "captions": json.dumps(captions)},
    )
    os.replace(tmp, path)  # a crash leaves a .part file, never a truncated cache under the real name


def _cached(path: Path, key) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """The cached tensors and captions, or None when the file is not for this key (regenerated then)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != json.dumps(asdict(key), sort_keys=True):
            return None
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(meta["captions"])  # noqa: SIM118 (no __iter__)


def _read(path: Path, key: SampleKey) -> TeacherSamples | None:
    """The cached samples, or None when the file is not for this key (regenerated then)."""
    cached = _cached(path, key)
    if cached is None:
        return None
    tensors, captions = cached
    return TeacherSamples(tensors["noise"], tensors["latents"], captions)
