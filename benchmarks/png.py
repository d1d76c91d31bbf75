"""What a served PNG costs at each zlib level: microseconds to encode and bytes, for images a model generates,
through fewstep's encoder (models/images.py: small RGB images written directly, larger ones through PIL) and
through PIL alone.

The server encodes small images on its device thread as their batch ends and larger ones off the event loop
(server/engine.py, server/serving.py), on the cores that run the model, so the level is a trade of CPU time
against bytes (`png_compress_level`, docs/api.md). Every level is lossless: the script checks that each
encoding decodes to the same pixels.

    python benchmarks/png.py [--model zoo/digits-consistency] [--images 32] [--repeat 20] [--steps 1]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from PIL import Image

from fewstep.models.images import encode, to_pil
from fewstep.models.pipeline import TextToImage


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("zoo/digits-consistency"))
    p.add_argument("--images", type=int, default=32, help="images generated (1 step), each encoded --repeat times")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--steps", type=int, default=1)
    args = p.parse_args()
    model = TextToImage.load(args.model, device="cpu")
    prompts = [f"a red {i % 10} on black" for i in range(args.images)]
    images = to_pil(model.generate(prompts, list(range(args.images)), steps=args.steps))
    pixels = [im.tobytes() for im in images]
    rows = []
    for level in range(10):
        timed = []
        for enc in (lambda im, lv=level: encode(im, "png", png_level=lv), lambda im, lv=level: _pil(im, lv)):
            t0 = time.perf_counter()
            for _ in range(args.repeat):
                encoded = [enc(im) for im in images]
            us = 1e6 * (time.perf_counter() - t0) / (args.repeat * len(images))
            assert [Image.open(io.BytesIO(b)).convert("RGB").tobytes() for b in encoded] == pixels, level
            timed.append((us, sum(map(len, encoded)) / len(encoded)))
        rows.append((level, *timed))
    base = dict((level, ours) for level, ours, _ in rows)[6]
    print(f"{len(images)} images of {images[0].width}×{images[0].height} from {args.model}, {args.repeat} rounds\n")
    print("| zlib level | µs per image | bytes per image | time vs 6 | bytes vs 6 | PIL alone: µs | PIL alone: bytes |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for level, (us, size), (pil_us, pil_size) in rows:
        print(f"| {level} | {us:.1f} | {size:.0f} | {us / base[0]:.2f}× | {size / base[1]:.2f}× | {pil_us:.1f} | "
              f"{pil_size:.0f} |")  # fmt: skip
    return 0


def _pil(image: Image.Image, level: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
