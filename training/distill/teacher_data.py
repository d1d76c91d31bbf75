"""Data that the teacher generates before training: (noise, ODE sample) pairs for reflow, and the
synthetic training images of LADD. Saved next to the run, so a resumed run does not pay for them twice."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from fewstep.models.pipeline import TextToImage
from fewstep.models.sampling import sample_euler
from fewstep.training.data import load_data, sample_batch


@torch.no_grad()
def generate_pairs(teacher: TextToImage, n: int, steps: int, guidance: float, path: Path, data: str = "digits",
                   batch_size: int = 128, seed: int = 0) -> dict[str, torch.Tensor | list[str]]:
    """n (noise, teacher sample) latent pairs for captions drawn like the training data."""
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if len(saved["captions"]) >= n:
            return {k: v[:n] for k, v in saved.items()}
    g = torch.Generator().manual_seed(seed)
    captions = sample_batch(load_data(data, "train"), n, g).captions
    noise = torch.randn(n, *teacher.latent_shape, generator=g)
    grid = teacher.grid(steps)
    out = []
    for lo in tqdm(range(0, n, batch_size), desc=f"teacher samples ({steps} steps)", unit="batch"):
        z = noise[lo:lo + batch_size].to(teacher.device)
        fn = teacher.velocity_fn(teacher.encode_text(captions[lo:lo + batch_size]), guidance)
        out.append(sample_euler(fn, z, grid).cpu())
    pairs = {"noise": noise, "latents": torch.cat(out), "captions": captions}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(pairs, tmp)
    tmp.replace(path)
    return pairs


def draw(pairs: dict, n: int, generator: torch.Generator) -> dict:
    idx = torch.randint(0, len(pairs["captions"]), (n,), generator=generator)
    return {"z": pairs["noise"][idx], "x": pairs["latents"][idx], "captions": [pairs["captions"][i] for i in idx]}
