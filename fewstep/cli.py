"""The ``fewstep`` command: data, train, distill, sample, eval, serve, generate."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    def register(fn_pair):
        add_args, run = fn_pair
        COMMANDS[name] = (help, add_args, run)
        return fn_pair

    return register


# ---- data ------------------------------------------------------------------------------------------------
def _data_args(p: argparse.ArgumentParser) -> None:
    """`fewstep data` takes no arguments: the cache is FEWSTEP_CACHE or ~/.cache/fewstep."""


def _data_run(args: argparse.Namespace) -> int:
    from fewstep.training.data import ensure_mnist

    print(ensure_mnist())
    return 0


command("data", "download MNIST for the colored-digits benchmark (once)")((_data_args, _data_run))


# ---- train -----------------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML training config (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", help="run directory (default: the config's out)")


def _train_run(args: argparse.Namespace) -> int:
    from fewstep.training.config import TrainConfig, load_config
    from fewstep.training.distributed import init_from_env, shutdown
    from fewstep.training.loop import train
    from fewstep.training.stages import make_recipe

    cfg = load_config(TrainConfig, args.config, args.set)
    if args.out:
        from dataclasses import replace

        cfg = replace(cfg, out=args.out)
    init_from_env(cfg.device)
    try:
        info = train(cfg, make_recipe(cfg))
    finally:
        shutdown()
    print(f"trained {info.step} steps in {info.seconds / 60:.1f} min; exported to {cfg.out}/export")
    return 0


command("train", "train an autoencoder, a teacher or the evaluation classifier")((_train_args, _train_run))


# ---- distill ---------------------------------------------------------------------------------------------
def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="progressive, consistency, reflow, dmd2 or ladd")
    p.add_argument("--teacher", help="teacher: a directory, or a name in FEWSTEP_MODELS or ./zoo")
    p.add_argument("--out", help="run directory (default: runs/distill/METHOD)")
    p.add_argument("--config", help="YAML distillation config (configs/distill-*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--max-steps", type=int, help="bound the optimizer steps (and the data generated for them)")


def _distill_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fewstep.training.config import load_config
    from fewstep.training.distill.config import DistillConfig
    from fewstep.training.distill.methods import METHODS, distill
    from fewstep.training.distributed import init_from_env, shutdown

    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {sorted(METHODS)}, not {args.method!r}")
    cfg = load_config(DistillConfig, args.config, args.set)
    changes = {"method": args.method, "teacher": _resolve_model(args.teacher or (cfg.teacher if args.config else None))}
    if args.out or not args.config:
        changes["out"] = args.out or f"runs/distill/{args.method}"
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError("--max-steps must be >= 1")
        changes["max_steps"] = args.max_steps
    cfg = replace(cfg, **changes)
    init_from_env(cfg.device)
    try:
        students = distill(cfg)
    finally:
        shutdown()
    print("students:", *map(str, students), sep="\n  ")
    return 0


command("distill", "distil a teacher into a 1-4-step student")((_distill_args, _distill_run))


# ---- sample ----------------------------------------------------------------------------------------------
def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a directory, or a name in FEWSTEP_MODELS or ./zoo")


def _kernels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", choices=["auto", "triton", "torch"],
                   help="attention/norm/modulation kernels: auto = Triton on CUDA, PyTorch elsewhere "
                        "(default: FEWSTEP_KERNELS, else auto)")


def _kernel_mode(args: argparse.Namespace) -> str:
    """The --kernels flag, else FEWSTEP_KERNELS, else auto: parsed here once and passed to the model."""
    from fewstep.kernels.runtime import mode_from_env, parse_mode

    return parse_mode(args.kernels, "--kernels") if args.kernels else mode_from_env()


def _resolve_model(path: str | None, default: str = "digits-teacher"):
    from fewstep.paths import resolve_model

    return resolve_model(path, default)


def _sample_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("--prompts-file", required=True, help="one prompt per line")
    p.add_argument("--out", required=True, help="directory for 000000.png, 000001.png, ... in file order")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's default)")
    p.add_argument("--seed", type=int, default=0, help="line i uses seed + i")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _kernels_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace PNGs already in --out")


def _sample_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fewstep.kernels.runtime import resolve_device
    from fewstep.models.images import save_pngs
    from fewstep.models.pipeline import TextToImage

    prompts_file = Path(args.prompts_file)
    if not prompts_file.is_file():
        raise ValueError(f"--prompts-file {prompts_file}: no such file")
    prompts = [line.strip() for line in prompts_file.read_text().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--prompts-file {prompts_file}: no prompts in it")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    out = Path(args.out)
    clash = [out / f"{i:06d}.png" for i in range(len(prompts)) if (out / f"{i:06d}.png").exists()]
    if clash and not args.overwrite:
        raise ValueError(f"{clash[0]} already exists ({len(clash)} files would be replaced); pass --overwrite")
    model = TextToImage.load(_resolve_model(args.model), resolve_device(args.device), _kernel_mode(args))
    steps = model.sampling.default_steps if args.steps is None else args.steps
    if not model.supports(steps):
        raise ValueError(f"{model.name} supports steps {model.sampling.supported_steps()}, not {steps}")
    seeds = [args.seed + i for i in range(len(prompts))]
    import time

    t0 = time.perf_counter()
    for lo in range(0, len(prompts), args.batch_size):
        hi = lo + args.batch_size
        images = model.generate(prompts[lo:hi], seeds[lo:hi], steps=steps, guidance=args.guidance)
        save_pngs(images, out, start=lo)
        print(f"\r{model.name}: {min(hi, len(prompts))}/{len(prompts)} images", end="", file=sys.stderr, flush=True)
    dt = time.perf_counter() - t0
    print(file=sys.stderr)
    print(f"wrote {len(prompts)} PNGs to {out} ({model.name}, {steps} steps, {1000 * dt / len(prompts):.1f} ms/image)")
    return 0


command("sample", "generate one PNG per prompt line with a teacher or student")((_sample_args, _sample_run))


# ---- eval ------------------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("--steps", help="comma-separated step counts, e.g. 1,2,4,50 (default: the model's default)")
    p.add_argument("--n", type=int, default=1000, help="images per step count")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the model's)")
    p.add_argument("--classifier", help="judge checkpoint (default: digits-classifier in the models directory)")
    p.add_argument("--out", help="directory for eval.json, eval.md and sample grids (default: runs/eval/NAME)")
    p.add_argument("--data", default="digits", help="digits, or synthetic for smoke tests")
    p.add_argument("--device", default="auto")
    _kernels_arg(p)


def _eval_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fewstep.kernels.runtime import resolve_device
    from fewstep.models.images import grid
    from fewstep.models.pipeline import TextToImage
    from fewstep.training.classifier import load_classifier
    from fewstep.training.evaluate import eval_prompts, evaluate, write_results

    if args.n < 2:
        raise ValueError("--n must be at least 2 (a Fréchet distance needs a covariance)")
    model = TextToImage.load(_resolve_model(args.model), resolve_device(args.device), _kernel_mode(args))
    try:
        steps = [int(s) for s in args.steps.split(",")] if args.steps else [model.sampling.default_steps]
    except ValueError:
        raise ValueError(f"--steps must be comma-separated integers, got {args.steps!r}") from None
    for s in steps:
        if not model.supports(s):
            raise ValueError(f"{model.name} supports steps {model.sampling.supported_steps()}, not {s}")
    classifier = load_classifier(_resolve_model(args.classifier, "digits-classifier"))
    results = evaluate(model, classifier, steps, n=args.n, guidance=args.guidance, data=args.data)
    out = Path(args.out or Path("runs") / "eval" / model.name)
    j, m = write_results(results, out)
    ep = eval_prompts(40)
    for s in steps:
        images = model.generate(ep.prompts, ep.seeds, steps=s, guidance=args.guidance)
        grid(images, nrow=10).save(out / f"samples_{s}steps.png")
    print(m.read_text())
    print(f"wrote {j}, {m} and sample grids to {out}")
    return 0


command("eval", "measure digit/color accuracy, Fréchet distance and speed")((_eval_args, _eval_run))


# ---- serve -----------------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="directory of checkpoints to serve (default: FEWSTEP_MODELS, else ./zoo)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    _kernels_arg(p)
    p.add_argument("--config", help="YAML file of settings (see docs/api.md); flags and FEWSTEP_* override it")
    p.add_argument("--default-model", help="model for requests that name none")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument("--queue-size", type=int)
    p.add_argument("--request-timeout-s", type=float)
    p.add_argument("--api-key", action="append", dest="api_keys", help="require this Bearer key on /v1 (repeatable)")
    p.add_argument("--no-warmup", action="store_false", dest="warmup", default=None)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _serve_run(args: argparse.Namespace) -> int:
    from fewstep.server.main import serve
    from fewstep.server.settings import load_settings

    flags = {k: getattr(args, k) for k in ("models", "host", "port", "device", "default_model", "max_batch",
                                           "max_wait_ms", "queue_size", "request_timeout_s", "api_keys",
                                           "warmup", "log_level", "kernels")}
    serve(load_settings(args.config, **flags))
    return 0


command("serve", "serve the models over HTTP (REST + OpenAI-compatible images API)")((_serve_args, _serve_run))


# ---- generate --------------------------------------------------------------------------------------------
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server URL (default %(default)s)")
    p.add_argument("--steps", type=int)
    p.add_argument("-n", type=int, default=1, help="images")
    p.add_argument("--seed", type=int)
    p.add_argument("--model")
    p.add_argument("--guidance", type=float)
    p.add_argument("--format", default="png", choices=["png", "jpeg", "webp"])
    p.add_argument("-o", "--output", default="out.png",
                   help="file (n = 1) or stem: out.png -> out-0.png, out-1.png, ... (default %(default)s)")
    p.add_argument("--api-key")
    p.add_argument("--overwrite", action="store_true")


def _generate_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fewstep.clients.sdk import FewstepClient, FewstepError

    out = Path(args.output)
    paths = [out] if args.n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(args.n)]
    clash = [p for p in paths if p.exists()]
    if clash and not args.overwrite:
        raise ValueError(f"{clash[0]} already exists; pass --overwrite")
    import httpx

    try:
        with FewstepClient(args.url, api_key=args.api_key) as client:
            result = client.generate(args.prompt, steps=args.steps, n=args.n, seed=args.seed, model=args.model,
                                     guidance=args.guidance, output_format=args.format)
    except FewstepError as e:
        raise ValueError(f"server said {e.status}: {e.message}") from None
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {args.url}: {e}") from None
    for path, image in zip(paths, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.data)
    fallback = f", fallback: {result.fallback_reason}" if result.fallback_reason else ""
    print(f"wrote {', '.join(map(str, paths))}: served by {result.served_by} in {result.steps} steps{fallback}; "
          f"{result.timings.total_ms:.1f} ms (queue {result.timings.queue_ms:.1f}, "
          f"inference {result.timings.inference_ms:.1f}, encode {result.timings.encode_ms:.1f}); "
          f"seeds {[im.seed for im in result.images]}")
    return 0


command("generate", "ask a running server for images")((_generate_args, _generate_run))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    from fewstep.models.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"fewstep {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
