"""Offline generation: prompts in, one PNG per prompt out, in prompt order (``fewstep sample``, benchmarks)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fewstep.errors import UsageError
from fewstep.models.images import save_pngs
from fewstep.models.pipeline import TextToImage


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--prompts-file {path}: no such file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts-file {path}: no prompts in it")
    return prompts


@dataclass(frozen=True)
class Written:
    paths: list[Path]
    steps: int
    seconds: float

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.seconds / max(1, len(self.paths))


def generate_to_dir(
    model: TextToImage,
    prompts: Sequence[str],
    out: Path,
    steps: int | None = None,
    seed: int = 0,
    guidance: float | None = None,
    batch_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
) -> Written:
    """Line i -> ``out/{i:06d}.png`` from (prompt i, seed + i): the same image whatever the batch size.

    Refuses to replace existing files unless ``overwrite``: nothing a user saved is replaced silently.
    """
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    steps = model.sampling.default_steps if steps is None else steps
    if not model.supports(steps):
        raise UsageError(f"{model.name} supports steps {model.steps_text()}, not {steps}")
    clash = [out / f"{i:06d}.png" for i in range(len(prompts)) if (out / f"{i:06d}.png").exists()]
    if clash and not overwrite:
        raise UsageError(f"{clash[0]} already exists ({len(clash)} files would be replaced); pass --overwrite")
    seeds = [seed + i for i in range(len(prompts))]
    paths: list[Path] = []
    t0 = time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        hi = lo + batch_size
        images = model.generate(prompts[lo:hi], seeds[lo:hi], steps=steps, guidance=guidance)
        paths += save_pngs(images, out, start=lo)
        if progress:
            print(f"\r{model.name}: {len(paths)}/{len(prompts)} images", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return Written(paths, steps, time.perf_counter() - t0)
