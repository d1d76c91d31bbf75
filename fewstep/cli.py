"""The ``fewstep`` command: data, train, distill, compress, sample, eval, convert, serve, generate.

Each command parses its flags and calls the library; the work itself lives in the packages, where the
benchmarks call it too. A user's mistake (a UsageError, a CheckpointError) is one line and exit status 2;
anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fewstep.errors import UsageError

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_args, run)
        return run

    return register


def _model_arg(p: argparse.ArgumentParser, flag: str = "--model", default: str = "digits-teacher") -> None:
    p.add_argument(flag, help=f"a checkpoint directory, or a name in FEWSTEP_MODELS or ./zoo (default: {default})")


def _kernels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kernels",
        choices=["auto", "triton", "torch"],
        help="attention/norm/modulation kernels: auto = Triton on CUDA, PyTorch elsewhere "
        "(default: FEWSTEP_KERNELS, else auto)",
    )


def _load(args: argparse.Namespace, directory: Path):
    """The checkpoint in ``directory`` on --device with --kernels (else FEWSTEP_KERNELS): parsed here once."""
    from fewstep.kernels.runtime import mode_from_env, parse_mode, resolve_device
    from fewstep.models.pipeline import TextToImage

    mode = parse_mode(args.kernels, "--kernels") if args.kernels else mode_from_env()
    return TextToImage.load(directory, resolve_device(args.device), mode)


# ---- data ------------------------------------------------------------------------------------------------
@command("data", "download MNIST for the colored-digits benchmark (once; cached in FEWSTEP_CACHE)", lambda p: None)
def _data(args: argparse.Namespace) -> int:
    from fewstep.training.data import ensure_mnist

    print(ensure_mnist())
    return 0


# ---- train -----------------------------------------------------------------------------------------------
def _config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", required=required, help="YAML config (configs/*.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key; nested sections with dots: consistency.grid_steps=16",
    )
    p.add_argument("--out", help="run directory (default: the config's out)")


@command(
    "train", "train an autoencoder, a teacher or the evaluation classifier", lambda p: _config_args(p, required=True)
)
def _train(args: argparse.Namespace) -> int:
    from fewstep.training.config import TrainConfig, load_config
    from fewstep.training.distributed import init_from_env, shutdown
    from fewstep.training.loop import train
    from fewstep.training.stages import make_recipe

    cfg = load_config(TrainConfig, args.config, args.set)
    if args.out:
        cfg = replace(cfg, out=args.out)
    init_from_env(cfg.device)
    try:
        info = train(cfg, make_recipe(cfg))
    finally:
        shutdown()
    print(f"trained {info.step} steps in {info.seconds / 60:.1f} min; exported to {cfg.out}/export")
    return 0


# ---- distill ---------------------------------------------------------------------------------------------
def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        required=True,
        help="progressive, consistency, reflow, dmd2, ladd, guidance or compress (fewstep compress)",
    )
    _model_arg(p, "--teacher")
    _config_args(p, required=False)
    p.add_argument("--max-steps", type=int, help="bound the optimizer steps (and the data generated for them)")


def _run_distill(args: argparse.Namespace, method: str, default_out: str, **sections) -> list[Path]:
    """``fewstep distill`` and ``fewstep compress``: the config, the flags over it, then the run (one process per
    device under torchrun). ``sections``: replacements inside the method's own config section."""
    from fewstep.paths import resolve_model
    from fewstep.training.config import load_config
    from fewstep.training.distill.config import DistillConfig
    from fewstep.training.distill.methods import distill
    from fewstep.training.distributed import init_from_env, shutdown

    cfg = load_config(DistillConfig, args.config, args.set)
    teacher = args.teacher or (cfg.teacher if args.config else None)
    changes = {"method": method, "teacher": str(resolve_model(teacher, "digits-teacher"))}
    if args.out or not args.config:
        changes["out"] = args.out or default_out
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UsageError("--max-steps must be >= 1")
        changes["max_steps"] = args.max_steps
    if sections:
        changes[method] = replace(getattr(cfg, method), **sections)
    cfg = replace(cfg, **changes)
    init_from_env(cfg.device)
    try:
        return distill(cfg)
    finally:
        shutdown()


@command("distill", "distil a teacher into a 1-4-step student", _distill_args)
def _distill(args: argparse.Namespace) -> int:
    from fewstep.training.distill.methods import METHODS

    if args.method not in METHODS:
        raise UsageError(f"--method must be one of {sorted(METHODS)}, not {args.method!r}")
    students = _run_distill(args, args.method, f"runs/distill/{args.method}")
    print("students:", *map(str, students), sep="\n  ")
    return 0


# ---- compress --------------------------------------------------------------------------------------------
def _compress_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p, "--teacher")
    _config_args(p, required=False)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--remove", type=int, help="remove this many of the least important blocks (default: a third)")
    which.add_argument("--keep", help="keep exactly these blocks: double.0,double.1,single.3 (or d0,d1,s3)")
    p.add_argument("--criterion", choices=["io_mse", "output_loss", "bi"], help="how blocks are ranked (io_mse)")
    p.add_argument("--max-steps", type=int, help="bound the optimizer steps")


@command("compress", "remove transformer blocks, then train the smaller model back with KD", _compress_args)
def _compress(args: argparse.Namespace) -> int:
    section = {"remove": args.remove, "keep": args.keep, "criterion": args.criterion}
    section = {k: v for k, v in section.items() if v is not None}
    if "remove" in section or "keep" in section:  # one replaces the other, whatever the config said
        section = {"remove": None, "keep": None, **section}
    (model,) = _run_distill(args, "compress", "runs/compress", **section)
    print(f"compressed model: {model}\nranking: {model.parent / 'ranking.md'}")
    return 0


# ---- sample ----------------------------------------------------------------------------------------------
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


@command("sample", "generate one PNG per prompt line with a teacher or student", _sample_args)
def _sample(args: argparse.Namespace) -> int:
    from fewstep.models.generate import generate_to_dir, read_prompts
    from fewstep.paths import resolve_model

    prompts = read_prompts(args.prompts_file)
    model = _load(args, resolve_model(args.model, "digits-teacher"))
    done = generate_to_dir(
        model,
        prompts,
        Path(args.out),
        steps=args.steps,
        seed=args.seed,
        guidance=args.guidance,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {len(done.paths)} PNGs to {args.out} ({model.name}, {done.steps} steps, "
        f"{done.ms_per_image:.1f} ms/image)"
    )
    return 0


# ---- eval ------------------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("--steps", help="comma-separated step counts, e.g. 1,2,4,50 (default: the model's default)")
    p.add_argument("--n", type=int, default=1000, help="images per step count")
    p.add_argument(
        "--guidance",
        help="CFG scale (default: the model's); several, comma-separated (1.5,2,3), sweep them: with --write-card "
        "the best FD among scales whose accuracies reach --guidance-min-accuracy becomes the model's default",
    )
    p.add_argument(
        "--guidance-min-accuracy",
        type=float,
        default=0.99,
        help="with a guidance sweep: the digit and color accuracy a scale must reach (default %(default)s)",
    )
    _model_arg(p, "--classifier", "digits-classifier")
    p.add_argument("--out", help="directory for eval.json, eval.md and sample grids (default: runs/eval/NAME)")
    p.add_argument("--data", default="digits", help="digits, or synthetic for smoke tests")
    p.add_argument("--device", default="auto")
    _kernels_arg(p)
    p.add_argument(
        "--write-card",
        action="store_true",
        help="record the measured rows in the model's card (its evaluation section, which routing "
        "reads) and, for a student, which step counts it serves",
    )
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=0.95,
        help="with --write-card: a student serves the step counts whose digit, foreground and "
        "background accuracies all reach this (default %(default)s)",
    )


@command("eval", "measure digit/color accuracy, Fréchet distance and speed", _eval_args)
def _eval(args: argparse.Namespace) -> int:
    from fewstep.paths import resolve_model
    from fewstep.training.classifier import load_classifier
    from fewstep.training.evaluate import choose_guidance, evaluate, record_in_card, sweep_table, write_results

    if args.n < 2:
        raise UsageError("--n must be at least 2 (a Fréchet distance needs a covariance)")
    for flag in ("min_accuracy", "guidance_min_accuracy"):
        if not 0 <= getattr(args, flag) <= 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be within [0, 1]")
    try:
        steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    except ValueError:
        raise UsageError(f"--steps must be comma-separated integers, got {args.steps!r}") from None
    try:
        scales = [float(g) for g in args.guidance.split(",")] if args.guidance else [None]
    except ValueError:
        raise UsageError(f"--guidance must be comma-separated numbers, got {args.guidance!r}") from None
    if any(g is not None and not 0 <= g <= 50 for g in scales):
        raise UsageError("--guidance must be within [0, 50]")
    model_dir = resolve_model(args.model, "digits-teacher")
    judge = resolve_model(args.classifier, "digits-classifier")
    model = _load(args, model_dir)
    steps = steps or [model.sampling.default_steps]
    for s in steps:
        if not model.supports(s):
            raise UsageError(f"{model.name} supports steps {model.steps_text()}, not {s}")
    if len(scales) > 1 and model.card.role == "student" and not model.transformer.cfg.guidance_embed:
        raise UsageError(f"{model.name} has its guidance distilled in: there is no scale to sweep")
    classifier = load_classifier(judge)
    out = Path(args.out or Path("runs") / "eval" / model.name)
    sweep = []
    for g in scales:
        results = evaluate(model, classifier, steps, n=args.n, guidance=g, data=args.data)
        where = out if len(scales) == 1 else out / f"guidance-{results['guidance']:g}"
        j, m = write_results(results, where, model, g)
        print(m.read_text())
        print(f"wrote {j}, {m} and sample grids to {where}")
        sweep.append(results)
    chosen = choose_guidance(sweep, args.guidance_min_accuracy) if len(sweep) > 1 else sweep[0]
    if len(sweep) > 1:
        table = sweep_table(sweep, chosen)
        (out / "guidance.md").write_text(f"# Guidance sweep of {model.name}\n\n{table}")
        print(table + f"chosen: guidance {chosen['guidance']:g} (lowest FD at ≥ {args.guidance_min_accuracy:.0%} "
              f"digit and color accuracy); wrote {out / 'guidance.md'}")  # fmt: skip
    if args.write_card:
        command = "fewstep " + " ".join(sys.argv[1:])
        card = record_in_card(
            model_dir, chosen, model, judge, args.min_accuracy, command=command,
            sweep=sweep if len(sweep) > 1 else None, guidance_min_accuracy=args.guidance_min_accuracy,
        )  # fmt: skip
        served = card.serves_steps()
        print(
            f"recorded in {model.name}'s card (default guidance {card.sampling.guidance:g})"
            + (f"; it serves steps {served}" if card.role == "student" else "")
        )
    return 0


# ---- convert ---------------------------------------------------------------------------------------------
def _convert_args(p: argparse.ArgumentParser) -> None:
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-diffusers", metavar="PATH", help="a FluxTransformer2DModel or FluxPipeline folder")
    way.add_argument("--to-diffusers", metavar="DIR", help="a fewstep checkpoint holding an MMDiT (a student too)")
    p.add_argument("--out", required=True, help="the checkpoint (from) or FluxTransformer2DModel folder (to) to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


@command("convert", "convert Flux transformers between diffusers and fewstep (exact weight copies)", _convert_args)
def _convert(args: argparse.Namespace) -> int:
    from fewstep.models import convert

    if args.from_diffusers:
        card = convert.from_diffusers(args.from_diffusers, args.out, args.overwrite)
        t = card.model["transformer"]
        print(
            f"wrote {args.out}: a fewstep transformer checkpoint ({t['depth_double']} double + {t['depth_single']} "
            f"single blocks, hidden {t['hidden_size']}, guidance embedding {t['guidance_embed']})"
        )
    else:
        out = convert.to_diffusers(args.to_diffusers, args.out, args.overwrite)
        print(f"wrote {out}: FluxTransformer2DModel.from_pretrained({str(out)!r}) loads it")
    return 0


# ---- serve -----------------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    """One flag per ServeSettings field: adding a setting there adds its flag here."""
    from fewstep.server.settings import ServeSettings

    p.add_argument("--config", help="YAML file of settings (see docs/api.md); flags and FEWSTEP_* override it")
    for name, field in ServeSettings.model_fields.items():
        kind, flag = field.annotation, "--" + name.replace("_", "-")
        help_text = (field.description or "").replace("%", "%%")  # argparse %-formats help strings
        args = typing.get_args(kind)
        if kind is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:  # repeatable: --api-key K --api-key K2
            p.add_argument(flag.rstrip("s"), dest=name, action="append", help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            p.add_argument(flag, dest=name, choices=args, help=help_text)
        else:
            base = next((a for a in args if a is not type(None)), kind) if args else kind
            p.add_argument(flag, dest=name, type=str if base is Path else base, help=help_text)


@command("serve", "serve the models over HTTP (REST + OpenAI-compatible images API)", _serve_args)
def _serve(args: argparse.Namespace) -> int:
    from fewstep.server.main import serve
    from fewstep.server.settings import ServeSettings, load_settings

    flags = {name: getattr(args, name) for name in ServeSettings.model_fields}
    serve(load_settings(args.config, **flags))
    return 0


# ---- quality gate ----------------------------------------------------------------------------------------
def _gate_common(p: argparse.ArgumentParser) -> None:
    _model_arg(p, "--model", "digits-consistency")
    _model_arg(p, "--classifier", "digits-classifier")
    p.add_argument("--steps", help="comma-separated step counts (default: those the student serves)")
    p.add_argument("--device", default="auto")
    _kernels_arg(p)


def _train_gate_args(p: argparse.ArgumentParser) -> None:
    _gate_common(p)
    p.add_argument("--out", help="the critic's checkpoint directory (default: zoo/STUDENT-gate beside the student)")
    p.add_argument("--n", type=int, default=5000, help="student samples per step count (default %(default)s)")
    p.add_argument("--iters", type=int, default=1500, help="critic training steps (default %(default)s)")
    p.add_argument("--overwrite", action="store_true")


def _gate_steps(args: argparse.Namespace, model) -> list[int]:
    if args.steps:
        try:
            steps = [int(s) for s in args.steps.split(",")]
        except ValueError:
            raise UsageError(f"--steps must be comma-separated integers, got {args.steps!r}") from None
    else:
        steps = model.card.serves_steps() if model.card else []
    if model.card is None or model.card.role != "student":
        raise UsageError(f"{model.name} is not a student: the gate judges a student's images")
    bad = [s for s in steps if not model.supports(s)]
    if not steps or bad:
        raise UsageError(f"{model.name} supports steps {model.steps_text()}, not {bad or steps}")
    return steps


@command("train-gate", "train a critic that scores a student's images (the quality gate)", _train_gate_args)
def _train_gate(args: argparse.Namespace) -> int:
    from fewstep.paths import resolve_model
    from fewstep.training.classifier import load_classifier
    from fewstep.training.gate import TRAIN_SEED, judged_samples, save_critic, train_critic

    if args.n < 10 or args.iters < 1:
        raise UsageError("--n must be at least 10 and --iters at least 1")
    model_dir = resolve_model(args.model, "digits-consistency")
    out = Path(args.out) if args.out else model_dir.parent / f"{model_dir.name}-gate"
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite")
    model = _load(args, model_dir)
    steps = _gate_steps(args, model)
    judge = load_classifier(resolve_model(args.classifier, "digits-classifier")).to(model.device)
    samples = judged_samples(model, judge, args.n, steps, seed=TRAIN_SEED)
    critic, report = train_critic(samples, iters=args.iters)
    training = {"steps_sampled": steps, "n_per_steps": args.n, "iters": args.iters, **report,
                "command": "fewstep " + " ".join(sys.argv[1:])}  # fmt: skip
    if out.exists():
        import shutil

        shutil.rmtree(out)
    save_critic(out, critic, model, training)
    print(
        f"critic written to {out}: {report['samples']} samples, {report['wrong_share']:.2%} judged wrong, "
        f"held-out AUC {report['val_auc']}; next: fewstep calibrate-gate --model {model_dir} --gate {out}"
    )
    return 0


def _calibrate_gate_args(p: argparse.ArgumentParser) -> None:
    _gate_common(p)
    p.add_argument("--gate", help="the critic's checkpoint directory (default: STUDENT-gate beside the student)")
    p.add_argument("--rate", type=float, default=0.05, help="share of images the gate sends on (default %(default)s)")
    p.add_argument("--n", type=int, default=2000, help="calibration images per step count (default %(default)s)")


@command("calibrate-gate", "choose the gate's thresholds for a target share and write them into the student's card",
         _calibrate_gate_args)  # fmt: skip
def _calibrate_gate(args: argparse.Namespace) -> int:
    from fewstep.models.checkpoint import update_card
    from fewstep.models.critic import CRITIC, load_critic
    from fewstep.paths import resolve_model
    from fewstep.training.classifier import load_classifier
    from fewstep.training.gate import CALIBRATION_SEED, judged_samples, score_samples, thresholds

    if not 0 < args.rate < 1:
        raise UsageError("--rate must be within (0, 1)")
    if args.n < 10:
        raise UsageError("--n must be at least 10")
    model_dir = resolve_model(args.model, "digits-consistency")
    gate_dir = Path(args.gate) if args.gate else model_dir.parent / f"{model_dir.name}-gate"
    critic, gate_card = load_critic(gate_dir)
    model = _load(args, model_dir)
    if gate_card.teacher is not None and gate_card.teacher.sha256 != model.weights_sha256():
        raise UsageError(f"{gate_dir} was trained on {gate_card.teacher.name}'s images, not {model.name}'s")
    steps = _gate_steps(args, model)
    judge = load_classifier(resolve_model(args.classifier, "digits-classifier")).to(model.device)
    samples = judged_samples(model, judge, args.n, steps, seed=CALIBRATION_SEED)
    scores = score_samples(critic.to(model.device), samples)
    chosen = thresholds(scores, samples.steps, args.rate)
    measured = {}
    for s, thr in chosen.items():
        at = samples.steps == s
        sent = scores[at] < thr
        wrong = ~samples.right[at]
        measured[str(s)] = {
            "sent": round(float(sent.float().mean()), 4),
            "wrong": round(float(wrong.float().mean()), 4),
            "wrong_caught": round(float((sent & wrong).sum() / max(1, int(wrong.sum()))), 4),
            "accuracy_kept": round(float(samples.right[at][~sent].float().mean()), 4),
        }
    gate = {"name": gate_dir.name, "sha256": gate_card.files[CRITIC].sha256, "rate": args.rate,
            "thresholds": {str(s): t for s, t in chosen.items()}, "n": args.n, "measured": measured,
            "command": "fewstep " + " ".join(sys.argv[1:])}  # fmt: skip
    update_card(model_dir, gate=gate)
    for s, m in measured.items():
        print(
            f"{s} steps: threshold {chosen[int(s)]:.4f}; sends {m['sent']:.1%} of images on; of the "
            f"{m['wrong']:.1%} judged wrong it catches {m['wrong_caught']:.0%}; right among those kept: "
            f"{m['accuracy_kept']:.2%}"
        )
    print(f"wrote the gate into {model_dir / 'card.json'} (serve with --quality-gate to turn it on)")
    return 0


# ---- generate --------------------------------------------------------------------------------------------
def _steps_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not an integer or "auto"') from None


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server URL (default %(default)s)")
    p.add_argument(
        "--steps",
        type=_steps_arg,
        help='sampling steps, or "auto": the most steps the server predicts to meet --latency-slo-ms',
    )
    p.add_argument("--latency-slo-ms", type=float, help="with --steps auto: the latency target (default: the server's)")
    p.add_argument("-n", type=int, default=1, help="images")
    p.add_argument("--seed", type=int)
    p.add_argument("--model")
    p.add_argument("--guidance", type=float)
    p.add_argument("--width", type=int, help="image width (default: the model's; GET /v1/models lists its sizes)")
    p.add_argument("--height", type=int, help="image height (default: the model's)")
    p.add_argument("--format", default="png", choices=["png", "jpeg", "webp"])
    p.add_argument(
        "-o",
        "--output",
        default="out.png",
        help="file (n = 1) or stem: out.png -> out-0.png, out-1.png, ... (default %(default)s)",
    )
    p.add_argument("--api-key")
    p.add_argument("--overwrite", action="store_true")


@command("generate", "ask a running server for images", _generate_args)
def _generate(args: argparse.Namespace) -> int:
    import httpx

    from fewstep.clients import FewstepClient, FewstepError

    out = Path(args.output)
    paths = [out] if args.n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(args.n)]
    clash = [p for p in paths if p.exists()]
    if clash and not args.overwrite:
        raise UsageError(f"{clash[0]} already exists; pass --overwrite")
    try:
        with FewstepClient(args.url, api_key=args.api_key) as client:
            result = client.generate(
                args.prompt,
                steps=args.steps,
                n=args.n,
                seed=args.seed,
                model=args.model,
                guidance=args.guidance,
                output_format=args.format,
                width=args.width,
                height=args.height,
                latency_slo_ms=args.latency_slo_ms,
            )
    except FewstepError as e:
        raise UsageError(f"server said {e.status}: {e.message}") from None
    except httpx.HTTPError as e:
        raise UsageError(f"cannot reach {args.url}: {e}") from None
    for path, image in zip(paths, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.data)
    fallback = f", fallback: {result.fallback_reason}" if result.fallback_reason else ""
    if result.auto:
        a = result.auto
        fallback += f" (steps auto: predicted {a['predicted_ms']:.0f} ms for a {a['latency_slo_ms']:.0f} ms target)"
    t = result.timings
    print(
        f"wrote {', '.join(map(str, paths))}: served by {result.served_by} in {result.steps} steps{fallback}; "
        f"{t.total_ms:.1f} ms (queue {t.queue_ms:.1f}, inference {t.inference_ms:.1f}, encode {t.encode_ms:.1f}); "
        f"seeds {[im.seed for im in result.images]}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    from fewstep.models.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (UsageError, CheckpointError) as e:  # the user's to fix: one line, no traceback
        print(f"fewstep {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
