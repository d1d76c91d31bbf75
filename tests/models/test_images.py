"""models/images.py: the small-image PNG writer against PNG's layout and PIL's decoder, and which writer encode()
picks."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fewstep.models.images import SMALL_PNG_PIXELS, encode, small_png


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, each CRC checked."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, data = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", png[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        out.append((kind, data))
        at += 12 + length
    return out


def test_small_png_lays_out_one_pixel_as_the_spec_says():
    rgb = np.array([[[255, 0, 7]]], np.uint8)  # one red-ish pixel
    chunks = _chunks(small_png(rgb, level=1))
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    # width 1, height 1, bit depth 8, colour type 2 (RGB), deflate, filter method 0, no interlace
    assert chunks[0][1] == b"\x00\x00\x00\x01" + b"\x00\x00\x00\x01" + bytes([8, 2, 0, 0, 0])
    assert zlib.decompress(chunks[1][1]) == bytes([0, 255, 0, 7])  # filter byte 0 (none), then R, G, B
    assert chunks[2][1] == b""


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (32, 32), (64, 64)])
@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_small_png_decodes_to_the_same_pixels(shape, level):
    rgb = np.random.default_rng(sum(shape) + level).integers(0, 256, (*shape, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(small_png(rgb, level)))
    assert decoded.mode == "RGB" and decoded.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(decoded), rgb)


def test_higher_levels_give_fewer_bytes_for_a_compressible_image():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[8:24, 12:20] = (200, 30, 30)
    assert len(small_png(rgb, 9)) <= len(small_png(rgb, 1)) < len(small_png(rgb, 0))


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8)]
)
def test_small_png_refuses_what_is_not_rgb_bytes(bad):
    with pytest.raises(ValueError, match="uint8"):
        small_png(bad)


def test_encode_writes_small_rgb_images_itself_and_larger_ones_through_pil():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert encode(Image.fromarray(small, "RGB"), "png", png_level=1) == small_png(small, 1)
    side = int(SMALL_PNG_PIXELS**0.5) + 1
    large = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    via_pil = encode(Image.fromarray(large, "RGB"), "png", png_level=1)
    assert via_pil != small_png(large, 1)  # PIL's (filtered) stream
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(via_pil))), large)
    grey = Image.fromarray(small[..., 0], "L")  # not RGB: PIL, whatever the size
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode(grey, "png")))), small[..., 0])
