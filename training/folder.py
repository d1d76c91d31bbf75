"""Your own data: a folder of captioned images (``data: folder:PATH``), or captions alone (``data: prompts:FILE``,
one per line: what the data-free methods, reflow and LADD, need of a real model's data).

Captions come from ``metadata.jsonl`` beside the images (one {"file_name": ..., "text": ...} per line, the
layout Hugging Face's imagefolder uses), or else from a ``NAME.txt`` beside each ``NAME.png`` (the layout
kohya-style trainers use). Images are center-cropped to squares and resized to the model's image size once,
at load; every 20th image (by sorted file name) is held out as the "valid" split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fewstep.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
HOLDOUT_EVERY = 20


@dataclass(frozen=True)
class CaptionedImages:
    images: torch.Tensor  # (N, 3, S, S) uint8
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


@dataclass(frozen=True)
class Captions:
    """Prompts without images."""

    captions: list[str]
    images = None

    def __len__(self) -> int:
        return len(self.captions)


def load_prompts(path: str | Path) -> Captions:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"prompts file {path}: cannot read it ({e})") from None
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise UsageError(f"prompts file {path}: no prompts (one per line)")
    return Captions(captions)


def _captions(root: Path) -> dict[str, str]:
    meta = root / "metadata.jsonl"
    if meta.exists():
        out = {}
        for i, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["file_name"])] = str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f'{meta}:{i}: expected {{"file_name": ..., "text": ...}}') from None
        return out
    out = {}
    for p in sorted(root.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            txt = p.with_suffix(".txt")
            if not txt.exists():
                raise UsageError(f"{p}: no caption; add {txt.name} or a metadata.jsonl in {root}")
            out[p.name] = txt.read_text(encoding="utf-8").strip()
    return out


def folder_captions(root: str | Path) -> list[str]:
    """Every caption of a folder (both splits), without reading an image."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist")
    return list(_captions(root).values())


def _square(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"{path}: not a readable image ({e})") from None
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def load_folder(root: str | Path, split: str = "train", size: int = 32) -> CaptionedImages:
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist")
    if split not in ("train", "valid", "test"):
        raise UsageError(f"split must be train, valid or test, not {split!r}")
    captions = _captions(root)
    names = sorted(captions)
    held = {n for i, n in enumerate(names) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1}
    names = [n for n in names if (n in held) == (split != "train")]
    if not names:
        raise UsageError(f"data folder {root}: no captioned images for split {split!r}")
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise UsageError(f"{root}: metadata.jsonl names {missing[0]}, which is not there")
    images = np.stack([_square(root / n, size) for n in names])  # (N, S, S, 3)
    return CaptionedImages(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [captions[n] for n in names])
