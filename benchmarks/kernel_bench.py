"""Kernel benchmark: each Triton kernel against its PyTorch reference, and attention against every SDPA backend.

    python benchmarks/kernel_bench.py --out docs/kernels-<card>.md     # on a CUDA GPU

Shapes: Flux at 1024² (batch 1, 24 heads, 4096 image + 512 text tokens, head_dim 128, bf16) and the digits
model (batch 64, 4 heads, 16 + 12 tokens, head_dim 64). Prints milliseconds, TFLOP/s (attention:
4·B·H·L²·D forward FLOPs) and GB/s (norm/RoPE and modulation: bytes read + written once) with the device
name; targets on an H100 (issue 5): attention ≥ SDPA's best backend and ≥ 500 TFLOP/s, qk_norm_rope ≥ 80 %
of memory bandwidth.

    TRITON_INTERPRET=1 python benchmarks/kernel_bench.py --smoke     # any machine: tiny shapes, checks it runs

The smoke run checks that every kernel runs and agrees with its reference; its times mean nothing.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.kernels.attention import attention_ref
from fewstep.kernels.modulation import adaln_modulate_ref
from fewstep.kernels.qk_norm_rope import qk_norm_rope_ref
from fewstep.kernels.runtime import interpreting
from fewstep.models.rope import position_ids, rope_tables


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    n_txt: int
    grid: int  # image tokens = grid²
    head_dim: int
    axes: tuple[int, int, int]
    dtype: torch.dtype

    @property
    def tokens(self) -> int:
        return self.n_txt + self.grid * self.grid


SHAPES = [
    Shape("flux-1024px", 1, 24, 512, 64, 128, (16, 56, 56), torch.bfloat16),
    Shape("flux-1024px-fp16", 1, 24, 512, 64, 128, (16, 56, 56), torch.float16),
    Shape("digits-b64", 64, 4, 12, 4, 64, (16, 24, 24), torch.bfloat16),
]
SMOKE = [Shape("smoke", 2, 2, 5, 4, 32, (8, 12, 12), torch.float32)]


def bench(fn: Callable[[], object], device: torch.device, smoke: bool) -> float:
    """Median milliseconds; triton.testing.do_bench on a GPU (L2 flushed between runs), one call in a smoke run."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def sdpa_backends() -> list[tuple[str, object]]:
    """Every SDPA backend this torch build knows, each forced alone (a backend that cannot run is reported)."""
    from torch.nn.attention import SDPBackend

    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    return [(n.lower(), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def run(shapes: list[Shape], device: torch.device, smoke: bool) -> list[dict]:
    return [row for s in shapes for row in bench_shape(s, device, smoke)]


def bench_shape(s: Shape, device: torch.device, smoke: bool) -> list[dict]:
    from torch.nn.attention import sdpa_kernel

    from fewstep.kernels.attention_triton import attention_triton
    from fewstep.kernels.modulation_triton import adaln_modulate_triton
    from fewstep.kernels.qk_norm_rope_triton import qk_norm_rope_triton

    rows: list[dict] = []
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, length, d, dt = s.batch, s.heads, s.tokens, s.head_dim, s.dtype
    c = h * d
    size = dt.itemsize
    # ---- qk_norm_rope: from the fused qkv projection's output to (B, H, L, D) q and k
    qkv = torch.randn(b, length, 3 * c, generator=g).to(device, dt)
    cos, sin = (t.to(device) for t in rope_tables(position_ids(s.n_txt, s.grid, s.grid), s.axes, 10_000))
    scales = [torch.rand(d, generator=g).add(0.5).to(device) for _ in range(4)]
    args = (qkv, cos, sin, scales[0], scales[1], h, 1e-6, s.n_txt, scales[2], scales[3])
    moved = 4 * b * length * c * size + 2 * cos.numel() * 4  # q, k read and written; cos, sin read
    for impl, fn in (("triton", qk_norm_rope_triton), ("torch reference", qk_norm_rope_ref)):
        ms = bench(lambda fn=fn: fn(*args), device, smoke)
        rows.append(dict(shape=s.name, kernel="qk_norm_rope", impl=impl, ms=ms, gbps=moved / ms / 1e6))
    q, k, v = qk_norm_rope_ref(*args)
    err = (qk_norm_rope_triton(*args)[0].float() - q.float()).abs().max().item()
    rows[-2]["max_err"] = err
    # ---- attention: key-padding mask over the text tokens, output in (B, L, H·D)
    mask = torch.ones(b, length, dtype=torch.bool, device=device)
    flops = 4 * b * h * length * length * d
    ms = bench(lambda: attention_triton(q, k, v, mask), device, smoke)
    err = (attention_triton(q, k, v, mask).float() - attention_ref(q, k, v, mask).float()).abs().max().item()
    rows.append(dict(shape=s.name, kernel="attention", impl="triton", ms=ms, tflops=flops / ms / 1e9, max_err=err))
    ms = bench(lambda: attention_ref(q, k, v, mask), device, smoke)
    rows.append(dict(shape=s.name, kernel="attention", impl="sdpa (torch's choice)", ms=ms, tflops=flops / ms / 1e9))
    sdpa_mask = mask[:, None, None, :]
    for name, backend in [] if smoke else sdpa_backends():
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)  # noqa: E731
                fn()
                ms = bench(fn, device, smoke)
            rows.append(dict(shape=s.name, kernel="attention", impl=f"sdpa {name}", ms=ms, tflops=flops / ms / 1e9))
        except RuntimeError as e:  # e.g. flash does not take an attention mask
            rows.append(
                dict(shape=s.name, kernel="attention", impl=f"sdpa {name}", ms=None, note=str(e).splitlines()[0][:80])
            )
    # without a mask, which is what Flux itself runs (no padded text): SDPA may pick flash here
    for impl, fn in (
        ("sdpa, no mask", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)),
        ("triton, no mask", lambda: attention_triton(q, k, v, None)),
    ):
        ms = bench(fn, device, smoke)
        rows.append(dict(shape=s.name, kernel="attention", impl=impl, ms=ms, tflops=flops / ms / 1e9))
    # ---- adaLN modulation
    x = torch.randn(b, length, c, generator=g).to(device, dt)
    mod = torch.randn(b, 1, 6 * c, generator=g).to(device, dt)
    shift, scale = mod[..., :c], mod[..., c : 2 * c]
    moved = 2 * x.numel() * size
    for impl, fn in (("triton", adaln_modulate_triton), ("torch reference", adaln_modulate_ref)):
        ms = bench(lambda fn=fn: fn(x, shift, scale), device, smoke)
        rows.append(dict(shape=s.name, kernel="adaln_modulate", impl=impl, ms=ms, gbps=moved / ms / 1e6))
    err = adaln_modulate_triton(x, shift, scale).float() - adaln_modulate_ref(x, shift, scale).float()
    rows[-2]["max_err"] = err.abs().max().item()
    return rows


def markdown(rows: list[dict], device_name: str, smoke: bool) -> str:
    head = [
        f"Device: **{device_name}**; torch {torch.__version__}; triton {_triton_version()}; "
        f"{platform.python_version()}."
        + (" Smoke run under TRITON_INTERPRET=1: times are meaningless." if smoke else ""),
        "",
        "| shape | kernel | implementation | ms | TFLOP/s | GB/s | max abs err vs reference |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:

        def f(key, fmt, r=r):
            return format(r[key], fmt) if r.get(key) is not None else "—"

        impl = r["impl"] + (f" ({r['note']})" if r.get("note") else "")
        head.append(
            f"| {r['shape']} | {r['kernel']} | {impl} | {f('ms', '.4f')} | {f('tflops', '.1f')} "
            f"| {f('gbps', '.0f')} | {f('max_err', '.2e')} |"
        )
    return "\n".join(head) + "\n"


def _triton_version() -> str:
    import triton

    return triton.__version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    if args.smoke:
        if not interpreting():
            p.error("--smoke runs Triton on the CPU: set TRITON_INTERPRET=1")
        device, shapes, name = torch.device("cpu"), SMOKE, f"CPU ({platform.processor() or platform.machine()})"
    else:
        if not torch.cuda.is_available() or interpreting():
            p.error(
                "the benchmark times kernels on a CUDA GPU (unset TRITON_INTERPRET); "
                "use --smoke with TRITON_INTERPRET=1 to check it runs elsewhere"
            )
        device, shapes, name = torch.device("cuda"), SHAPES, torch.cuda.get_device_name()
    with torch.inference_mode() if not args.smoke else nullcontext():
        rows = run(shapes, device, args.smoke)
    table = markdown(rows, name, args.smoke)
    print(table)
    if args.out:
        out = Path(args.out)
        if out.exists():
            p.error(f"{out} exists; pick another --out (results are never overwritten)")
        out.write_text(f"# Kernel benchmark\n\n`python benchmarks/kernel_bench.py --out {out}`\n\n{table}")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
