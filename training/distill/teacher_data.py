"""Data that the teacher generates before training: (noise, ODE sample) latent pairs for reflow, and the
synthetic training images of LADD.

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

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from fewstep.models.pipeline import TextToImage
from fewstep.models.sampling import sample_euler
from fewstep.training.data import load_data, sample_batch

FORMAT = 1


@dataclass(frozen=True)
class SampleKey:
    """Everything that determines a set of teacher samples."""

    teacher_sha256: str
    steps: int
    guidance: float
    seed: int
    data: str
    n: int
    latent_shape: tuple[int, ...] = ()  # a Flux teacher's depends on the training resolution
    format: int = FORMAT

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def path(self, directory: Path) -> Path:
        return directory / f"teacher-samples-{self.digest()}.safetensors"


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
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    save_file(
        {"noise": samples.noise.contiguous(), "latents": samples.latents.contiguous()},
        str(tmp),
        metadata={"key": json.dumps(asdict(key), sort_keys=True), "captions": json.dumps(captions)},
    )
    os.replace(tmp, path)  # a crash leaves a .part file, never a truncated cache under the real name
    return samples


def _read(path: Path, key: SampleKey) -> TeacherSamples | None:
    """The cached samples, or None when the file is not for this key (regenerated then)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != json.dumps(asdict(key), sort_keys=True):
            return None
        return TeacherSamples(f.get_tensor("noise"), f.get_tensor("latents"), json.loads(meta["captions"]))
