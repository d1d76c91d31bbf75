"""Flux-shaped transformer benchmark: one denoising step of fewstep's MMDiT against diffusers' FLUX.1 transformer.

    python benchmarks/flux.py --out docs/flux-gpu.md          # on a CUDA GPU: FLUX.1-dev's full shape, bf16
    python benchmarks/flux.py --smoke                         # any CPU: same code, 1 + 1 blocks, fp32, 256²

What it measures, with random weights (nothing is downloaded):

- One step = one transformer forward (``torch.no_grad``, CUDA-synchronised; warm-up, then the median of
  ``--iters``) of a FLUX.1-dev-shaped transformer (19 double + 38 single blocks, 24 heads × 128, guidance
  embedding) at 1024×1024 (4096 packed image tokens) with 512 T5 tokens, batch ``--batch``, for three rows:
  fewstep's MMDiT with its Triton kernels, the same MMDiT on PyTorch's SDPA, and diffusers'
  FluxTransformer2DModel. fewstep's weights are diffusers' converted by ``fewstep.models.flux`` and it is
  called through ``FluxMMDiT``, the adapter FluxPipeline serves, so the rows compute the same function:
  the report gives each row's largest and mean difference from diffusers' output, relative to that output's std,
  at sigma 0.5 and guidance 4.0 (×1000 exact in bf16), and under the table the difference at FLUX.1-dev's
  guidance 3.5, where diffusers rounds 1000·sigma and 1000·guidance to bf16 (FluxMMDiT rounds them the same way,
  so the difference stays at the level of bf16 arithmetic).
- Memory of a FLUX.1-schnell + FLUX.1-dev pair served together: parameter bytes at bf16 of CLIP-L, T5-XXL's
  encoder, the VAE and the two transformers, built on the meta device (exact arithmetic, no memory used), with
  and without the shared CLIP/T5/VAE that fewstep loads once (models/diffusers_model.py).

Public figures to set a step against (whole images: steps × one step + text encoders + VAE decode):
FLUX.1-dev at 1024², 28 steps: 6.71 s eager / 4.30 s with torch.compile on one H100 (xDiT's measurements);
FLUX.1-schnell at 1024², 4 steps: ≈ 0.72 s on one H100 with fp8 weights and torch.compile.

``--smoke`` (CPUs, CI) runs the same code at depth 1 + 1 (``--depth``), fp32 (``--dtype``), 256×256 (256 image
tokens) and 64 text tokens: it checks the script and the agreement, not speed. The Triton row is skipped off CUDA
(the kernels are checked in Triton's interpreter by tests/kernels); without --smoke a CUDA device is required.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fewstep.models.diffusers_model import module_bytes

SKIP_TRITON_CPU = "no CUDA device: Triton kernels run on GPUs; tests/kernels checks them in the interpreter"
GB = 1e9  # every table's unit: 10⁹ bytes
BF16 = 2  # bytes per parameter
EXACT = (0.5, 4.0)  # sigma, guidance: 1000× each is exact in bf16 (500, 4000)
DEV_DEFAULTS = (0.75, 3.5)  # FLUX.1-dev's guidance, a mid-schedule sigma: 750 and 3500 are not (752, 3504)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---- models ------------------------------------------------------------------------------------------------
def _init_random(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter in place: linear weights N(0, 1/fan_in), biases N(0, 0.02²), norm scales 1.

    Unit-variance layers keep the 57-block residual stream finite in bf16, and no layer is zero (a zero
    layer would hide a difference between two implementations)."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
            elif name.endswith(".weight"):  # RMSNorm scales of q and k
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)


def build_diffusers(depth: tuple[int, int] | None, guidance: bool, device: torch.device, dtype: torch.dtype):
    """diffusers' FluxTransformer2DModel with its defaults (FLUX.1's shape), random weights on ``device``."""
    from diffusers import FluxTransformer2DModel

    kwargs = {"num_layers": depth[0], "num_single_layers": depth[1]} if depth else {}
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=guidance, **kwargs)
    # cast on meta (plain nn.Module.to: no memory, no warning about from_pretrained), then allocated once
    model = torch.nn.Module.to(model, dtype=dtype).to_empty(device=device)
    _init_random(model, seed=0)
    return model.eval().requires_grad_(False)


def build_fewstep(theirs, device: torch.device, dtype: torch.dtype):
    """fewstep's MMDiT with ``theirs``' weights (models/flux.py), wrapped as FluxPipeline calls it."""
    from fewstep.models.flux import config_from_diffusers, state_from_diffusers
    from fewstep.models.flux_adapter import FluxMMDiT
    from fewstep.models.mmdit import MMDiT

    cfg = config_from_diffusers(dict(theirs.config))
    # converted tensors are new, on ``device`` already; the MMDiT holds them (built on meta)
    mmdit = MMDiT.from_state(cfg, state_from_diffusers(theirs.state_dict(), cfg))
    mmdit = mmdit.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return FluxMMDiT(mmdit).eval()


def make_inputs(
    batch: int, grid: int, n_txt: int, device: torch.device, dtype: torch.dtype, sigma: float, guidance: float
) -> dict:
    """FluxPipeline's transformer arguments: packed latents (B, grid², 64), T5 tokens, CLIP pooled, ids."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return dict(
        hidden_states=randn(batch, grid * grid, 64),
        encoder_hidden_states=randn(batch, n_txt, 4096),
        pooled_projections=randn(batch, 768),
        timestep=torch.full((batch,), sigma, device=device, dtype=dtype),  # the models embed 1000·sigma
        guidance=torch.full((batch,), guidance, device=device, dtype=dtype),  # and 1000·guidance
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, grid, grid, device, dtype),
        txt_ids=torch.zeros(n_txt, 3, device=device, dtype=dtype),
        return_dict=False,
    )


# ---- timing -------------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    ms: float | None = None
    max_diff: float | None = None  # max |out - diffusers'| / std(diffusers')
    mean_diff: float | None = None  # mean |out - diffusers'| / std(diffusers')
    peak_gb: float | None = None  # this model's weights + the forward's peak above what was allocated before it
    note: str = ""


def time_step(name: str, model, inputs: dict, device: torch.device, warmup: int, iters: int):
    """-> (median ms, peak GB or None, output) of one forward under no_grad, synchronised on CUDA."""
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    with torch.no_grad():
        for _ in tqdm(range(warmup), desc=f"{name} warm-up", file=sys.stderr, leave=False):
            model(**inputs)
        sync()
        if cuda:
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in tqdm(range(iters), desc=name, file=sys.stderr, leave=False):
            t0 = time.perf_counter()
            out = model(**inputs)[0]
            sync()
            times.append(1000 * (time.perf_counter() - t0))
    peak = None
    if cuda:
        peak = (module_bytes(model) + torch.cuda.max_memory_allocated(device) - before) / GB
    return statistics.median(times), peak, out.float()


def run_step(args, device: torch.device, dtype: torch.dtype) -> tuple[list[Row], str]:
    """The three rows, and (not in fp32) a line on the timestep/guidance rounding at FLUX.1-dev's defaults."""
    from fewstep.kernels.runtime import interpreting

    depth = tuple(args.depth) if args.depth else None
    grid, n_txt = args.size // 16, args.txt  # VAE ÷8, then 2×2 patches
    theirs = build_diffusers(depth, True, device, dtype)
    mine = build_fewstep(theirs, device, dtype)
    inputs = make_inputs(args.batch, grid, n_txt, device, dtype, *EXACT)

    rows = [
        Row("fewstep MMDiT, Triton kernels"),
        Row("fewstep MMDiT, PyTorch SDPA"),
        Row("diffusers FluxTransformer2DModel"),
    ]
    outs: dict[str, torch.Tensor] = {}
    ref_ms, ref_peak, ref = time_step("diffusers", theirs, inputs, device, args.warmup, args.iters)
    rows[2].ms, rows[2].peak_gb = ref_ms, ref_peak
    outs[rows[2].name] = ref
    for row, backend in ((rows[0], "triton"), (rows[1], "torch")):
        if backend == "triton" and device.type != "cuda":
            row.note = f"skipped: {SKIP_TRITON_CPU}"
            continue
        if backend == "triton" and interpreting():
            row.note = "skipped: TRITON_INTERPRET is set (the interpreter runs on CPU tensors only)"
            continue
        mine.mmdit.set_kernels(backend)
        try:
            row.ms, row.peak_gb, outs[row.name] = time_step(
                f"fewstep {backend}", mine, inputs, device, args.warmup, args.iters
            )
        except Exception as e:  # a kernel that fails at this shape is a result, not a crash of the benchmark
            row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    std = ref.std().item()
    for row in rows:
        if row.name in outs and row is not rows[-1]:
            diff = (outs[row.name] - ref).abs()
            row.max_diff, row.mean_diff = diff.max().item() / std, diff.mean().item() / std
    if dtype == torch.float32:
        return rows, ""
    # FLUX.1-dev's defaults: diffusers (like BFL's reference) rounds 1000·sigma and 1000·guidance to the model's
    # dtype before the sinusoidal embedding; FluxMMDiT rounds them the same way (models/flux_adapter.py)
    mine.mmdit.set_kernels("torch")
    dev = make_inputs(args.batch, grid, n_txt, device, dtype, *DEV_DEFAULTS)
    with torch.no_grad():
        a, b = theirs(**dev)[0].float(), mine(**dev)[0].float()
    diff, std = (b - a).abs(), a.std().item()
    rounded = [(torch.tensor(x, dtype=dtype) * 1000).item() for x in DEV_DEFAULTS]
    name = str(dtype).removeprefix("torch.")
    changed = ", ".join(f"{1000 * x:g} → {r:g}" for x, r in zip(DEV_DEFAULTS, rounded, strict=True) if r != 1000 * x)
    why = (
        f"diffusers rounds 1000·sigma and 1000·guidance to {name} ({changed}) before the sinusoidal embeddings, "
        "and FluxMMDiT rounds them the same way: what is left is bf16 arithmetic, as in the table"
        if changed
        else f"1000·sigma and 1000·guidance are exact in {name}"
    )
    note = (
        f"At sigma {DEV_DEFAULTS[0]} and guidance {DEV_DEFAULTS[1]} (FLUX.1-dev's default) fewstep (SDPA) differs "
        f"from diffusers by max {diff.max().item() / std:.2e} / mean {diff.mean().item() / std:.2e} of the output's "
        f"std: {why}. The table uses sigma {EXACT[0]}, guidance {EXACT[1]}, whose ×1000 is exact in bf16 and fp16, "
        "so it compares the transformers' arithmetic alone."
    )
    return rows, note


# ---- memory of a schnell + dev pair --------------------------------------------------------------------------
def pair_memory() -> list[tuple[str, int, bool]]:
    """(component, bf16 parameter bytes, shared by the pair) for FLUX.1-shaped components built on meta."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=768,
    )
    t5 = T5Config(
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_layers=24,
        num_heads=64,
        vocab_size=32128,
        feed_forward_proj="gated-gelu",
    )
    with torch.device("meta"):
        parts = [
            ("CLIP-L text encoder", CLIPTextModel(clip), True),
            ("T5-XXL encoder", T5EncoderModel(t5), True),
            (
                "VAE (AutoencoderKL, 16 latent channels)",
                AutoencoderKL(
                    down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4,
                    block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2,
                    latent_channels=16,
                    use_quant_conv=False,
                    use_post_quant_conv=False,
                ),
                True,
            ),
            (
                "transformer, FLUX.1-schnell (no guidance embedding)",
                FluxTransformer2DModel(guidance_embeds=False),
                False,
            ),
            ("transformer, FLUX.1-dev (guidance embedding)", FluxTransformer2DModel(guidance_embeds=True), False),
        ]
    return [(name, sum(p.numel() for p in m.parameters()) * BF16, shared) for name, m, shared in parts]


def memory_table(parts: list[tuple[str, int, bool]]) -> str:
    lines = [
        "| component | parameters | GB at bf16 | in the pair |",
        "|---|---:|---:|---|",
    ]
    for name, nbytes, shared in parts:
        lines.append(f"| {name} | {nbytes // BF16 / 1e9:.3f} B | {nbytes / GB:.2f} | {'shared' if shared else 'own'} |")
    shared = sum(b for _, b, s in parts if s)
    own = sum(b for _, b, s in parts if not s)
    apart, together = 2 * shared + own, shared + own
    lines += [
        "",
        "| schnell + dev | GB at bf16 |",
        "|---|---:|",
        f"| without sharing (two whole pipelines) | {apart / GB:.2f} |",
        f"| with CLIP, T5 and VAE loaded once | {together / GB:.2f} |",
        f"| saved | {(apart - together) / GB:.2f} ({apart - together:,} bytes) |",
    ]
    return "\n".join(lines)


# ---- report -------------------------------------------------------------------------------------------------
def step_table(rows: list[Row], cuda: bool) -> str:
    ref = rows[-1].ms
    lines = [
        "| implementation | ms / step | speed-up vs diffusers | max abs diff vs diffusers / std | mean abs diff / std "
        "| peak GB | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ms = f"{r.ms:.2f}" if r.ms is not None else "—"
        speed = f"{ref / r.ms:.2f}×" if r.ms and ref else "—"
        diff = "(reference)" if r is rows[-1] else f"{r.max_diff:.2e}" if r.max_diff is not None else "—"
        mean = "" if r is rows[-1] else f"{r.mean_diff:.2e}" if r.mean_diff is not None else "—"
        peak = f"{r.peak_gb:.1f}" if r.peak_gb is not None else ("—" if cuda else "n/a (CPU)")
        lines.append(f"| {r.name} | {ms} | {speed} | {diff} | {mean} | {peak} | {r.note} |")
    return "\n".join(lines)


def per_image(rows: list[Row], size: int, batch: int) -> str:
    """Transformer time alone for a 28-step dev image and a 4-step schnell image (no encoders, no VAE)."""
    out = []
    for r in rows:
        if r.ms is not None:
            out.append(f"{r.name}: {28 * r.ms / 1000:.2f} s (dev, 28 steps) / {4 * r.ms / 1000:.2f} s (schnell, 4)")
    what = f"{size}² image" if batch == 1 else f"batch of {batch} {size}² images"
    return f"Transformer time per {what} (steps × one step; text encoders and VAE not included): {'; '.join(out)}."


def report(args, rows: list[Row], note: str, parts, device_name: str, dtype: torch.dtype, cuda: bool) -> str:
    import diffusers

    depth = tuple(args.depth) if args.depth else (19, 38)
    grid = args.size // 16
    kind = " — CPU smoke run (reduced)" if not cuda else " — smoke run (reduced)"
    title = "Flux-shaped transformer, one denoising step" + (kind if args.smoke else "")
    head = [
        f"# {title}",
        "",
        f"`python {shlex.join(sys.argv)}`",
        "",
        f"- Device: **{device_name}**"
        + ("" if cuda else f" ({torch.get_num_threads()} torch threads)")
        + f"; torch {torch.__version__}; diffusers {diffusers.__version__}; dtype {str(dtype).removeprefix('torch.')}.",
        f"- Transformer: FLUX.1-dev shape (24 heads × 128, guidance embedding), depth {depth[0]} double + "
        f"{depth[1]} single blocks, random weights.",
        f"- Inputs: batch {args.batch}, {args.size}×{args.size} image → {grid}×{grid} = {grid * grid} packed "
        f"image tokens (64 channels), {args.txt} text tokens (4096 wide), pooled 768; sigma {EXACT[0]}, "
        f"guidance {EXACT[1]}.",
        f"- Median of {args.iters} timed forward{'s' * (args.iters > 1)} after {args.warmup} warm-up, torch.no_grad"
        + (", CUDA-synchronised; peak GB = the model's weights + the forward's peak above them." if cuda else "."),
    ]
    if args.smoke:
        head.append("- Smoke run: checks the code path and the agreement; the times say little about a GPU.")
    body = ["", "## One step", "", step_table(rows, cuda)]
    if note:
        body += ["", note]
    if not args.smoke:
        body += ["", per_image(rows, args.size, args.batch)]
    body += ["", "## Memory of a FLUX.1-schnell + FLUX.1-dev pair (parameters, bf16)", "", memory_table(parts)]
    return "\n".join(head + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU/CI: depth 1 + 1, fp32, 256², 64 text tokens")
    p.add_argument("--depth", type=int, nargs=2, metavar=("D", "S"), help="double and single blocks (default 19 38)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, help="image side in pixels, a multiple of 16 (default 1024; smoke 256)")
    p.add_argument("--txt", type=int, help="T5 tokens (default 512; smoke 64)")
    p.add_argument("--iters", type=int, help="timed forwards (default 20; smoke 2)")
    p.add_argument("--warmup", type=int, help="untimed forwards first (default 3; smoke 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bfloat16; smoke float32")
    p.add_argument("--out", help="also write the report to this Markdown file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    prog = "benchmarks/flux.py"
    smoke = dict(depth=[1, 1], size=256, txt=64, iters=2, warmup=1, dtype="float32")
    full = dict(depth=None, size=1024, txt=512, iters=20, warmup=3, dtype="bfloat16")
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.size % 16 or args.size <= 0:
        p.error(f"--size {args.size} is not a positive multiple of 16")
    if min(args.batch, args.txt, args.iters) < 1 or args.warmup < 0 or (args.depth and min(args.depth) < 0):
        p.error("--batch, --txt and --iters must be positive, --warmup and --depth not negative")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        print(f"{prog}: error: {out} exists; pick another --out or pass --overwrite", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda:
        print(
            f"{prog}: error: no CUDA device: the full FLUX.1 shape needs a GPU; pass --smoke to run the reduced "
            "CPU check",
            file=sys.stderr,
        )
        return 2
    if cuda and not args.smoke:
        from fewstep.kernels.runtime import interpreting

        if interpreting():
            print(
                f"{prog}: error: TRITON_INTERPRET is set: unset it to time the Triton kernels on CUDA", file=sys.stderr
            )
            return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"

    parts = pair_memory()
    rows, note = run_step(args, device, dtype)
    text = report(args, rows, note, parts, device_name, dtype, cuda)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
