"""Every recipe on a Flux-architecture teacher (training/flux.py): a tiny random FluxPipeline folder (dev-like, with
the guidance embedding; a schnell-like one for guidance distillation) distilled, compressed, exported as a fewstep
checkpoint and a FluxPipeline folder, loaded by diffusers, served by a real uvicorn server; FSDP2 under torchrun
with two gloo processes; configs/flux-mini.yaml parsed and started."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.errors import UsageError
from fewstep.models.checkpoint import read_card
from fewstep.models.convert import load_transformer
from fewstep.models.diffusers_model import component_id, read_spec
from fewstep.models.flux import mmdit_state_from_folder
from fewstep.training.config import load_config
from fewstep.training.distill.config import DistillConfig
from fewstep.training.distill.methods import distill
from fewstep.training.flux import CACHE_FILE, FluxTeacher, served_grid
from tests.serving import LiveServer, make_settings
from tests.tiny_pipelines import build_flux_pair, write_spec

ROOT = Path(__file__).resolve().parents[2]
SIZES = dict(width=32, height=32, min_side=16, max_side=64, max_sequence_length=16)
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 180, 60)}
# the smallest run of each method that trains and exports (the data a method generates first is bounded too)
METHODS = {
    "progressive": ["progressive.start_steps=2"],
    "consistency": [],
    "reflow": ["reflow.pairs=8", "reflow.pair_steps=2"],
    "dmd2": ["dmd2.fake_updates=1"],
    "ladd": ["ladd.samples=8", "ladd.sample_steps=2"],
    "guidance": [],
    "compress": ["compress.remove=1", "compress.calibration=4"],
}


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    schnell, dev = build_flux_pair(root)
    write_spec(dev, name="flux-teacher", role="teacher", default_steps=4, max_steps=20, guidance=3.5, **SIZES)
    write_spec(schnell, name="flux-cfg", role="teacher", default_steps=4, max_steps=20, guidance=2.0, **SIZES)
    images = root / "images"  # an image-caption folder (kohya layout: NAME.png + NAME.txt)
    images.mkdir()
    for i in range(24):
        name = list(COLORS)[i % 3]
        img = np.zeros((32, 32, 3), np.uint8)
        img[:] = COLORS[name]
        img[8:24, 8 + i % 4 : 20 + i % 4] = 255 - np.array(COLORS[name])
        Image.fromarray(img).save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(f"a {name} square")
    prompts = root / "prompts.txt"
    prompts.write_text("a red square\na blue square\na green square\n")
    return {"root": root, "dev": dev, "schnell": schnell, "images": images, "prompts": prompts}


def run(flux, method: str, out: Path, *extra: str, teacher: Path | None = None) -> list[Path]:
    data = f"prompts:{flux['prompts']}" if method in ("reflow", "ladd") else f"folder:{flux['images']}"
    teacher = teacher or (flux["schnell"] if method == "guidance" else flux["dev"])
    sets = [
        f"method={method}", f"teacher={teacher}", f"out={out}", f"data={data}", f"name=flux-{method}",
        "batch_size=4", "max_steps=3", "log_every=1", "warmup_steps=1", "export_dtype=float32",
        *METHODS[method], *extra,
    ]  # fmt: skip
    return distill(load_config(DistillConfig, None, sets))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_recipe_takes_a_flux_pipeline_teacher_and_exports_both_formats(flux, tmp_path, method):
    exports = run(flux, method, tmp_path / method)
    teacher_folder = flux["schnell"] if method == "guidance" else flux["dev"]
    sha = component_id(teacher_folder / "transformer")
    for export in exports:
        card = read_card(export)
        assert card.role == "transformer"
        lineage = card.compression.source if method == "compress" else card.teacher
        assert lineage.sha256 == sha  # the teacher named by the sha256 of its transformer files
        folder = export.with_name(export.name + "-diffusers")
        spec = read_spec(folder)
        assert spec.role == ("teacher" if method == "compress" else "student")
        # the same weights in both formats, and diffusers' own class loads them
        ours = load_transformer(export).state_dict()
        _, theirs = mmdit_state_from_folder(folder)
        assert all(torch.equal(ours[k], theirs[k].float()) for k in ours)
        model = FluxTransformer2DModel.from_pretrained(folder / "transformer")
        assert model.config.num_layers + model.config.num_single_layers == (2 if method == "compress" else 3)
        if spec.role == "student":  # FluxPipeline samples the student's own grids at every served step count
            for k in spec.supported_steps:
                assert served_grid(folder, k, 32) == pytest.approx(card.sampling.timesteps[str(k)], abs=1e-6)
            assert spec.teacher == ("flux-cfg" if method == "guidance" else "flux-teacher")


@pytest.mark.slow
@pytest.mark.parametrize(("method", "extra"), [("compress", ["compress.task_weight=0"]), ("guidance", [])])
def test_a_flux_students_loss_falls(flux, tmp_path, method, extra):
    run(flux, method, tmp_path / method, "max_steps=30", "lr=2e-3", "ema_decay=0.9", *extra)
    losses = [json.loads(line)["loss"] for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_the_teacher_grid_is_the_one_fluxpipeline_samples(flux):
    teacher = FluxTeacher(flux["dev"])
    pipe = FluxPipeline.from_pretrained(flux["dev"])
    pipe.set_progress_bar_config(disable=True)
    seen: list[float] = []

    def grab(p, i, t, kwargs):
        if not seen:
            seen.extend(float(s) for s in p.scheduler.sigmas)
        return kwargs

    pipe("a red square", num_inference_steps=4, width=32, height=32, guidance_scale=3.5, max_sequence_length=16,
         callback_on_step_end=grab, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert teacher.grid(4) == pytest.approx(seen, abs=1e-6)
    assert teacher.grid(4) != pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])  # shifted: not the uniform grid


def test_text_embeddings_are_computed_once_and_read_back(flux, tmp_path):
    teacher = FluxTeacher(flux["dev"])
    captions = ["a red square", "a blue square", "a red square"]
    teacher.precompute(captions, tmp_path)
    assert (tmp_path / CACHE_FILE).is_file()
    direct, pooled, _ = teacher.pipe.encode_prompt(prompt=["a blue square"], prompt_2=None, max_sequence_length=16)

    again = FluxTeacher(flux["dev"])
    again.pipe.encode_prompt = None  # the cache must answer: calling the encoders now would fail
    again.precompute(captions, tmp_path)
    cond = again.encode_text(["a blue square"])
    assert torch.equal(cond.tokens[0], direct[0]) and torch.equal(cond.pooled[0], pooled[0])


def test_prompts_only_data_is_refused_by_a_method_that_noises_images(flux, tmp_path):
    with pytest.raises(UsageError, match=r"captions only: give an image-caption folder \(folder:PATH\)"):
        run(flux, "progressive", tmp_path / "p", f"data=prompts:{flux['prompts']}")
    with pytest.raises(UsageError, match="already takes the guidance scale as an input"):
        run(flux, "guidance", tmp_path / "g", teacher=flux["dev"])


@pytest.mark.slow
def test_a_distilled_flux_student_is_served_with_its_teacher_behind_it(flux, tmp_path):
    (export,) = run(flux, "dmd2", tmp_path / "run")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(flux["dev"], models / "flux-teacher")
    shutil.copytree(export.with_name("export-diffusers"), models / "flux-dmd2")
    with LiveServer(make_settings(models, default_model="flux-dmd2", max_wait_ms=50.0)) as live, live.client() as c:
        one = c.post("/v1/generate", json={"prompt": "a red square", "steps": 1, "seed": 3}).json()
        three = c.post("/v1/generate", json={"prompt": "a red square", "steps": 3, "seed": 3}).json()
    assert (one["served_by"], one["steps"], one["fallback_reason"]) == ("flux-dmd2", 1, None)
    assert (three["served_by"], three["fallback_reason"]) == ("flux-teacher", "steps_unsupported")


def _fsdp_run(flux, out: Path, world: int, max_steps: int) -> None:
    args = [
        "compress", "--teacher", str(flux["dev"]), "--out", str(out), "--set", f"data=folder:{flux['images']}",
        "--set", "batch_size=4", "--set", f"max_steps={max_steps}", "--set", "compress.remove=1",
        "--set", "compress.calibration=4", "--set", "export_dtype=float32", "--set", "log_every=1",
        "--set", "warmup_steps=1", "--set", "lr=1e-3", "--set", "ckpt_every=2", "--set", "name=flux-fsdp",
        "--set", "parallel=fsdp",
    ]  # fmt: skip
    if world == 1:  # one process, in this one: the plain path (no process group)
        assert main(args) == 0
        return
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, "-m", "fewstep.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    # every rank's error lines first: the root cause is often another rank's, far from the tail
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line]
    assert done.returncode == 0, "\n".join(errors[-40:]) + "\n...\n" + done.stderr[-2000:]


@pytest.mark.slow
def test_fsdp2_with_two_gloo_processes_matches_one_process_and_resumes(flux, tmp_path):
    """The loss of every step, the exported weights and a resumed run: two FSDP2 processes as one process."""
    for world in (1, 2):
        _fsdp_run(flux, tmp_path / f"w{world}", world, max_steps=4)
        _fsdp_run(flux, tmp_path / f"w{world}", world, max_steps=6)  # resumes from state.pt at step 4
    logs = {w: [json.loads(x) for x in (tmp_path / f"w{w}" / "metrics.jsonl").read_text().splitlines()] for w in (1, 2)}
    assert [r["step"] for r in logs[2]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logs[2]] == pytest.approx([r["loss"] for r in logs[1]], rel=1e-4)
    a = load_file(tmp_path / "w1" / "export" / "transformer.safetensors")
    b = load_file(tmp_path / "w2" / "export" / "transformer.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_flux_mini_config_parses_and_starts_on_a_tiny_flux(flux, tmp_path):
    cfg = load_config(DistillConfig, ROOT / "configs" / "flux-mini.yaml")
    kept = cfg.compress.keep.split(",")
    assert [k for k in kept if k.startswith("double")] == [f"double.{i}" for i in (0, 1, 2, 10, 18)]
    assert [k for k in kept if k.startswith("single")] == [f"single.{i}" for i in (*range(3, 36, 4), 37)]
    assert (cfg.lr, cfg.compress.guidance, cfg.parallel, cfg.export_dtype) == (1e-4, 4.0, "fsdp", "bfloat16")
    tiny = [f"teacher={flux['dev']}", f"data=folder:{flux['images']}", f"out={tmp_path}", "resolution=32",
            "compress.keep=double.0,single.1", "compress.calibration=4", "batch_size=4", "max_steps=1"]  # fmt: skip
    (export,) = distill(load_config(DistillConfig, ROOT / "configs" / "flux-mini.yaml", tiny))
    card = read_card(export)
    assert card.compression.kept == ["double.0", "single.1"] and card.training["steps"] == 1
