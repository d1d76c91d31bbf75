"""Images in and out: tensors in [-1, 1] <-> PIL, PNG files and sample grids."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Images up to this many pixels are written as PNG directly (zlib over unfiltered rows): for a 32×32 image PIL's
# per-call machinery is most of the cost, about 2× the time (benchmarks/png.py). Larger images go through PIL,
# whose per-row filters compress natural images about a quarter better than no filter.
SMALL_PNG_PIXELS = 64 * 64
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB") for a in arr]


def encode(image: Image.Image, fmt: str = "png", quality: int = 95, png_level: int = 6) -> bytes:
    """``quality``: JPEG/WebP quality; ``png_level``: zlib level of a PNG (lossless at every level)."""
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt == "png" and image.mode == "RGB" and image.width * image.height <= SMALL_PNG_PIXELS:
        return small_png(np.asarray(image), png_level)
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=png_level)
    elif fmt in ("jpeg", "jpg"):
        image.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"output format must be png, jpeg or webp, not {fmt!r}")
    return buf.getvalue()


def small_png(rgb: np.ndarray, level: int = 6) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (H, W, 3) uint8: IHDR, one IDAT of the rows each behind filter byte 0 (none),
    deflated at zlib ``level``, and IEND (PNG spec §5, §11.2, §9.2)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"small_png takes (H, W, 3) uint8, not {rgb.shape} {rgb.dtype}")
    h, w, _ = rgb.shape
    rows = np.zeros((h, 1 + 3 * w), np.uint8)  # (H, 1 + 3W): the filter byte, then the row's RGB bytes
    rows[:, 1:] = rgb.reshape(h, 3 * w)
    # IHDR: width, height, 8 bits, colour type 2 (RGB), deflate, filter method 0, no interlace
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


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
