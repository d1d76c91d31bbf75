"""Images in and out: tensors in [-1, 1] <-> PIL, PNG files and sample grids."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB") for a in arr]


def encode(image: Image.Image, fmt: str = "png", quality: int = 95, png_level: int = 6) -> bytes:
    """``quality``: JPEG/WebP quality; ``png_level``: zlib level of a PNG (lossless at every level)."""
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=png_level)
    elif fmt in ("jpeg", "jpg"):
        image.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"output format must be png, jpeg or webp, not {fmt!r}")
    return buf.getvalue()


def grid(images: torch.Tensor, nrow: int, scale: int = 2, pad: int = 2) -> Image.Image:
    """Tile (B, 3, H, W) images into one PIL image, ``nrow`` per row, upscaled for viewing."""
    tiles = to_pil(images)
    h, w = tiles[0].height * scale, tiles[0].width * scale
    rows = (len(tiles) + nrow - 1) // nrow
    canvas = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        canvas.paste(tile.resize((w, h), Image.NEAREST), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def save_pngs(images: torch.Tensor, out: Path, start: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_pil(images), start=start):
        path = out / f"{i:06d}.png"
        img.save(path)
        paths.append(path)
    return paths
