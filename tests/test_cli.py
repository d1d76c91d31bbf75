"""The fewstep command as a user runs it: real subprocesses, tiny checkpoints."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fewstep.models.pipeline import TextToImage


def fewstep(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def test_sample_writes_one_png_per_line_in_order(tiny_teacher, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red 7 on black\n\nseven in red on a black background\na white 0 on blue\n")
    out = tmp_path / "out"
    r = fewstep(
        "sample",
        "--model",
        tiny_teacher,
        "--prompts-file",
        prompts,
        "--out",
        out,
        "--steps",
        3,
        "--seed",
        5,
        "--batch-size",
        2,
    )
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert "3 PNGs" in r.stdout
    img = Image.open(out / "000001.png")
    assert img.size == (32, 32) and img.mode == "RGB"
    # file order and seeds: line i is (prompt i, seed 5 + i)
    model = TextToImage.load(tiny_teacher)
    from fewstep.models.images import to_pil

    expect = to_pil(model.generate(["seven in red on a black background"], [6], steps=3))[0]
    assert np.array_equal(np.asarray(expect), np.asarray(img))


def test_sample_refuses_to_overwrite(tiny_teacher, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red 7 on black\n")
    out = tmp_path / "out"
    fewstep("sample", "--model", tiny_teacher, "--prompts-file", prompts, "--out", out, "--steps", 1)
    r = fewstep("sample", "--model", tiny_teacher, "--prompts-file", prompts, "--out", out, "--steps", 1, check=False)
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    fewstep("sample", "--model", tiny_teacher, "--prompts-file", prompts, "--out", out, "--steps", 1, "--overwrite")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompts-file", "missing.txt"], "no such file"),
        (["--steps", "0"], "supports steps"),
        (["--model", "nowhere"], "no model 'nowhere'"),
    ],
)
def test_sample_bad_input_is_a_clear_error(tiny_teacher, tmp_path, args, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red 7 on black\n")
    base = {"--model": str(tiny_teacher), "--prompts-file": str(prompts), "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2], strict=True):
        base[k] = v if k != "--prompts-file" else str(tmp_path / v)
    r = fewstep("sample", *[x for kv in base.items() for x in kv], check=False)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_eval_writes_json_markdown_and_grids(tiny_teacher, tiny_classifier, tmp_path):
    out = tmp_path / "eval"
    r = fewstep(
        "eval",
        "--model",
        tiny_teacher,
        "--classifier",
        tiny_classifier,
        "--steps",
        "1,2",
        "--n",
        20,
        "--data",
        "synthetic",
        "--out",
        out,
    )
    res = json.loads((out / "eval.json").read_text())
    assert [row["steps"] for row in res["rows"]] == [1, 2]
    for row in res["rows"]:
        for key in ("digit_accuracy", "fg_accuracy", "bg_accuracy"):
            assert 0.0 <= row[key] <= 1.0
        assert row["fd"] >= 0 and row["ms_per_image"] > 0
    assert res["n"] == 20 and res["real_floor_fd"] >= 0
    assert "| tiny-teacher | 2 |" in (out / "eval.md").read_text()
    assert (out / "samples_1steps.png").exists() and "eval.json" in r.stdout


def test_train_rejects_bad_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: teacher\nmodel: tiny\n")
    r = fewstep("train", "--config", cfg, "--set", "batch_size=many", check=False)
    assert r.returncode == 2 and "batch_size" in r.stderr and "Traceback" not in r.stderr
    r = fewstep("train", "--config", cfg, "--set", "data=synthetic", check=False)
    assert r.returncode == 2 and "autoencoder" in r.stderr


def test_every_server_setting_is_a_serve_flag():
    """Flags come from ServeSettings: a setting added there is a flag here, with its type and choices."""
    from fewstep.cli import build_parser
    from fewstep.server.settings import ServeSettings

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    dests = {a.dest for a in serve._actions}
    assert set(ServeSettings.model_fields) <= dests
    args = parser.parse_args(
        [
            "serve",
            "--max-batch",
            "4",
            "--api-key",
            "a",
            "--api-key",
            "b",
            "--no-warmup",
            "--kernels",
            "torch",
            "--max-wait-ms",
            "2.5",
        ]
    )
    assert (args.max_batch, args.api_keys, args.warmup, args.kernels, args.max_wait_ms) == (
        4,
        ["a", "b"],
        False,
        "torch",
        2.5,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--device", "tpu"])


def test_every_command_help_renders():
    """argparse %-formats help strings: a setting described with a bare % broke `fewstep serve --help`."""
    from fewstep.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert "serve" in commands
    for name, sub in commands.items():
        assert sub.format_help().startswith("usage: fewstep " + name), name


def test_usage_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from fewstep import cli
    from fewstep.errors import UsageError

    def user_mistake(args):
        raise UsageError("--thing: no such thing")

    def bug(args):
        raise ValueError("a bug, not the user's")

    help_text, add_args, _ = cli.COMMANDS["data"]
    monkeypatch.setitem(cli.COMMANDS, "data", (help_text, add_args, user_mistake))
    assert cli.main(["data"]) == 2
    assert capsys.readouterr().err.strip() == "fewstep data: error: --thing: no such thing"
    monkeypatch.setitem(cli.COMMANDS, "data", (help_text, add_args, bug))
    with pytest.raises(ValueError, match="a bug"):  # not swallowed into exit 2: python prints the traceback
        cli.main(["data"])


def test_missing_models_directory_says_how(tmp_path):
    (tmp_path / "x.txt").write_text("a red 7 on black\n")
    r = subprocess.run(
        [sys.executable, "-m", "fewstep.cli", "sample", "--prompts-file", "x.txt", "--out", "o"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2, r.stderr
    assert "FEWSTEP_MODELS" in r.stderr and "--models" in r.stderr and "Traceback" not in r.stderr


def test_eval_write_card_records_the_evaluation_and_the_served_steps(tiny_teacher, tiny_classifier, tmp_path):
    """`fewstep eval --write-card`: a typed evaluation in the card (which routing reads), the served counts by the
    accuracy gate, the grid of every measured count, the weights untouched."""
    from fewstep.models.checkpoint import read_card
    from tests.serving import build_models_dir

    student = build_models_dir(tmp_path / "models", tiny_teacher) / "tiny-student"
    weights = (student / "transformer.safetensors").read_bytes()
    base = ["eval", "--model", student, "--classifier", tiny_classifier, "--n", 20, "--data", "synthetic"]
    fewstep(*base, "--steps", "1,3", "--out", tmp_path / "e1", "--write-card", "--min-accuracy", 0)
    card = read_card(student)
    assert [r.steps for r in card.evaluation.rows] == [1, 3] and card.evaluation.n == 20
    assert card.evaluation.judge.name == "tiny-classifier" and "--write-card" in card.evaluation.command
    assert card.serves_steps() == [1, 3] and card.sampling.timesteps["3"] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    fewstep(*base, "--steps", "1,3", "--out", tmp_path / "e2", "--write-card", "--min-accuracy", 1.0)
    card = read_card(student)
    perfect = [r.steps for r in card.evaluation.rows if min(r.digit_accuracy, r.fg_accuracy, r.bg_accuracy) >= 1.0]
    assert card.serves_steps() == perfect and card.evaluation.min_accuracy == 1.0
    assert (student / "transformer.safetensors").read_bytes() == weights
    r = fewstep(*base, "--steps", "1", "--write-card", "--min-accuracy", 2, check=False)
    assert r.returncode == 2 and "--min-accuracy" in r.stderr


def test_choose_guidance_by_hand():
    from fewstep.training.evaluate import choose_guidance

    def res(g, acc, fd):
        return {"guidance": g, "rows": [{"digit_accuracy": acc, "fg_accuracy": 1.0, "bg_accuracy": 1.0, "fd": fd}]}

    sweep = [res(1.5, 0.986, 18.0), res(2.0, 0.998, 23.8), res(3.0, 1.0, 39.2)]  # the teacher's measured shape
    assert choose_guidance(sweep, 0.99)["guidance"] == 2.0  # the lowest FD among the accurate enough
    assert choose_guidance(sweep, 0.98)["guidance"] == 1.5
    assert choose_guidance(sweep, 1.01)["guidance"] == 3.0  # none passes: the most accurate


def test_eval_guidance_sweep_writes_the_chosen_default_into_the_card(tiny_teacher, tiny_classifier, tmp_path):
    import shutil

    from fewstep.models.checkpoint import read_card
    from fewstep.training.evaluate import choose_guidance
    from tests.serving import build_models_dir

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    base = ["eval", "--classifier", tiny_classifier, "--n", 20, "--data", "synthetic", "--steps", "2"]
    fewstep(*base, "--model", teacher, "--guidance", "1,2.5", "--out", tmp_path / "e", "--write-card",
            "--guidance-min-accuracy", 0)  # fmt: skip
    card = read_card(teacher)
    sweep = card.evaluation.guidance_sweep
    assert [r.guidance for r in sweep] == [1.0, 2.5] and card.evaluation.guidance_min_accuracy == 0
    rows = [{"guidance": r.guidance, "rows": [r.model_dump()]} for r in sweep]
    assert card.sampling.guidance == card.evaluation.guidance == choose_guidance(rows, 0)["guidance"]
    assert (tmp_path / "e" / "guidance.md").is_file() and (tmp_path / "e" / "guidance-2.5" / "eval.json").is_file()
    student = build_models_dir(tmp_path / "models", tiny_teacher) / "tiny-student"
    r = fewstep(*base, "--model", student, "--guidance", "1,2", check=False)
    assert r.returncode == 2 and "distilled in" in r.stderr
    r = fewstep(*base, "--model", teacher, "--guidance", "1,x", check=False)
    assert r.returncode == 2 and "comma-separated numbers" in r.stderr
