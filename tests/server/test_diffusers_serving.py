"""diffusers pipeline folders served end to end by a real uvicorn server: a tiny Flux pair (a schnell-like student,
a dev-like teacher with the guidance embedding, sharing CLIP, T5 and the VAE), a tiny SDXL-Turbo-like UNet
pipeline, a corrupted student and a student whose output is NaN; the images compared with what diffusers'
own FluxPipeline returns for the same arguments."""

from __future__ import annotations

import base64
import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from fewstep.cli import main
from fewstep.clients import FewstepClient
from tests.serving import LiveServer, make_settings
from tests.tiny_pipelines import build_flux_pair, build_sdxl_turbo, write_spec

SIZES = dict(width=32, height=32, min_side=16, max_side=64)
PROMPT = "a red 7 on black"


@pytest.fixture(scope="module")
def pipelines_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipelines")
    student, teacher = build_flux_pair(root)
    write_spec(student, name="flux-student", role="student", teacher="flux-teacher", supported_steps=[1, 2, 4],
               default_steps=4, guidance=0.0, max_sequence_length=64, **SIZES)  # fmt: skip
    write_spec(teacher, name="flux-teacher", role="teacher", default_steps=6, max_steps=20, guidance=3.5,
               max_sequence_length=64, **SIZES)  # fmt: skip
    sdxl = build_sdxl_turbo(root)
    write_spec(sdxl, name="sdxl-turbo", role="student", supported_steps=[1, 2, 4], default_steps=1, **SIZES)

    broken = root / "flux-broken"  # truncated transformer weights: cannot load
    shutil.copytree(student, broken)
    write_spec(broken, **{**json.loads((student / "fewstep.json").read_text()), "name": "flux-broken"})
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])

    nan = root / "flux-nan"  # loads and runs, and its images are NaN
    shutil.copytree(student, nan)
    write_spec(nan, **{**json.loads((student / "fewstep.json").read_text()), "name": "flux-nan"})
    weights = nan / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["proj_out.bias"] = torch.full_like(state["proj_out.bias"], float("nan"))
    save_file(state, weights)

    bad = root / "flux-bad-spec"  # a student without the step counts it serves
    shutil.copytree(student, bad)
    write_spec(bad, name="flux-bad-spec", role="student", default_steps=4)
    (root / "unmarked").mkdir()  # a pipeline without fewstep.json is not served
    shutil.copy(student / "model_index.json", root / "unmarked" / "model_index.json")
    return root


@pytest.fixture(scope="module")
def server(pipelines_dir):
    # warm-up off: the NaN student must reach a request (warm-up would mark it unavailable first) to show the
    # teacher regenerating its batch; tests/server/test_fallback.py covers warm-up failures
    settings = make_settings(pipelines_dir, default_model="flux-student", warmup=False, max_wait_ms=200.0)
    with LiveServer(settings) as live:
        yield live


def generate(server, **body) -> dict:
    with server.client() as c:
        r = c.post("/v1/generate", json={"prompt": PROMPT, "seed": 7, **body})
    assert r.status_code == 200, r.text
    return r.json()


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64"]))).convert("RGB")).astype(int)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_student_serves_its_step_counts(server, steps):
    out = generate(server, steps=steps)
    assert (out["served_by"], out["steps"], out["fallback_reason"]) == ("flux-student", steps, None)
    assert pixels(out["images"][0]).shape == (32, 32, 3)


@pytest.mark.slow
def test_more_steps_a_broken_and_a_nan_student_go_to_the_teacher_with_their_reasons(server):
    out = generate(server, steps=8)
    assert (out["served_by"], out["steps"], out["fallback_reason"]) == ("flux-teacher", 8, "steps_unsupported")
    out = generate(server, model="flux-broken", steps=2)
    assert (out["served_by"], out["fallback_reason"]) == ("flux-teacher", "student_unavailable")
    out = generate(server, model="flux-nan", steps=2)
    assert (out["served_by"], out["steps"], out["fallback_reason"]) == ("flux-teacher", 6, "student_error")
    assert np.isfinite(pixels(out["images"][0])).all()
    with server.client() as c:
        ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.text.startswith("degraded")
    assert "flux-broken" in ready.text and "not a readable safetensors file" in ready.text
    assert "flux-bad-spec" in ready.text and "supported_steps" in ready.text


def reference(folder: Path, seed: int, steps: int, guidance: float, width: int, height: int) -> np.ndarray:
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                 max_sequence_length=64, generator=torch.Generator("cpu").manual_seed(seed)).images[0]  # fmt: skip
    return np.asarray(image).astype(int)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "steps", "guidance"), [("flux-student", 2, 0.0), ("flux-teacher", 4, 3.5)])
def test_served_images_equal_diffusers_fluxpipeline_alone_and_in_a_batch(server, pipelines_dir, model, steps, guidance):
    body = dict(model=model, steps=steps, guidance=guidance, width=48, height=32)
    alone = generate(server, seed=11, **body)
    with ThreadPoolExecutor(4) as pool:  # four concurrent requests: one batch of 4 (max_wait_ms 200)
        together = list(pool.map(lambda s: generate(server, seed=s, **body), [11, 12, 13, 14]))
    assert max(r["batch_images"] for r in together) > 1
    for seed, out in zip([11, 11, 12, 13, 14], [alone, *together], strict=True):
        ref = reference(pipelines_dir / model, seed, steps, guidance, 48, 32)
        got = pixels(out["images"][0])
        assert ref.std() > 5  # a real picture, not a flat one
        assert np.abs(got - ref).max() <= 2, f"seed {seed}: differs from FluxPipeline by {np.abs(got - ref).max()}"


@pytest.mark.slow
def test_openai_client_with_size_and_the_unet_pipeline(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        result = client.images.generate(model="flux-student", prompt=PROMPT, n=2, size="48x32", quality="low")
        assert result.size == "48x32"
        for item in result.data:
            assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (48, 32)
        result = client.images.generate(model="sdxl-turbo", prompt=PROMPT, size="32x32")
        assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (32, 32)
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(model="flux-student", prompt=PROMPT, size="50x32")
        assert info.value.body["param"] == "size" and "multiple of 4" in info.value.body["message"]
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(model="flux-student", prompt=PROMPT, size="big")
        assert "WIDTHxHEIGHT" in info.value.body["message"]


@pytest.mark.slow
def test_sizes_are_checked_per_model_naming_the_field(server):
    with server.client() as c:
        for body, param, words in [
            ({"width": 30}, "width", "multiple of 4"),
            ({"height": 128}, "height", "between 16 and 64"),
            ({"model": "tiny-nothing", "width": 32}, "model", "does not exist"),
            ({"width": "32"}, "width", "integer"),
        ]:
            r = c.post("/v1/generate", json={"prompt": PROMPT, **body})
            assert r.status_code in (400, 404, 422) and r.status_code < 500
            err = r.json()["error"]
            assert err["param"] == param and words in err["message"], err


@pytest.mark.slow
def test_shared_components_are_loaded_once_and_reported(server):
    models = {m.name: m.model for m in server.engine.registry.models.values() if m.ready}
    student, teacher = models["flux-student"].pipe, models["flux-teacher"].pipe
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert getattr(student, name) is getattr(teacher, name)
    assert student.transformer is not teacher.transformer
    assert student.scheduler is not teacher.scheduler  # schedulers keep per-call state
    with server.client() as c:
        listing = c.get("/v1/models").json()
    by_id = {m["id"]: m for m in listing["data"]}
    shared_bytes = sum(p.numel() * p.element_size() for n in ("text_encoder", "text_encoder_2", "vae")
                       for p in getattr(student, n).parameters())  # fmt: skip
    assert listing["shared_bytes"] >= shared_bytes > 0
    # loaded by the first folder (in name order) that loaded whole: flux-broken failed and holds nothing
    assert by_id["flux-teacher"]["shared_components"]["vae"] == "flux-nan"
    assert by_id["flux-student"]["sizes"] == {"default": "32x32", "multiple": 4, "min_side": 16, "max_side": 64,
                                              "max_pixels": None}  # fmt: skip
    assert by_id["flux-student"]["format"] == "diffusers" and "unmarked" not in by_id


@pytest.mark.slow
def test_a_teacher_with_the_same_encoder_reuses_the_students_prompt_encoding(server):
    teacher = server.engine.registry.models["flux-teacher"].model
    calls = []
    original = teacher.pipe.encode_prompt
    teacher.pipe.encode_prompt = lambda *a, **k: calls.append(k) or original(*a, **k)
    try:
        out = generate(server, model="flux-nan", steps=2, seed=3)
        assert out["fallback_reason"] == "student_error"
        assert all(k.get("prompt_embeds") is not None for k in calls)  # given the embeddings, never the prompt
    finally:
        teacher.pipe.encode_prompt = original


@pytest.mark.slow
def test_sdk_and_cli_ask_for_a_size(server, tmp_path):
    with FewstepClient(server.url) as client:
        result = client.generate(PROMPT, model="flux-student", width=48, height=16, seed=1)
    assert Image.open(io.BytesIO(result.images[0].data)).size == (48, 16)
    out = tmp_path / "x.png"
    argv = ["generate", PROMPT, "--url", server.url, "--model", "flux-student", "--width", "24", "--height", "40"]
    assert main([*argv, "-o", str(out)]) == 0
    assert Image.open(out).size == (24, 40)


def test_a_fewstep_student_never_falls_back_to_a_pipeline_teacher(pipelines_dir, tiny_teacher, tmp_path):
    """With the student's own teacher absent, the lone-teacher guess is among checkpoints only: FLUX.1-dev must
    not answer for a digits student."""
    from fewstep.server.registry import Registry
    from tests.serving import build_models_dir

    models = tmp_path / "models"
    build_models_dir(tmp_path / "digits", tiny_teacher)
    shutil.copytree(tmp_path / "digits" / "tiny-student", models / "tiny-student")
    shutil.copytree(pipelines_dir / "flux-teacher", models / "flux-teacher")
    reg = Registry.scan(models, torch.device("cpu"), kernels="torch")
    assert reg.models["tiny-student"].teacher is None and reg.models["flux-teacher"].ready
    encoder = reg.models["flux-teacher"].model.pipe.text_encoder  # frozen: encoding keeps no autograd graph
    assert not any(p.requires_grad for p in encoder.parameters())


def test_a_pipelines_batches_never_run_on_a_throughput_stream(server):
    """A diffusers pipeline keeps its scheduler's state on itself: two batches of it at once would mix their
    timesteps, so the CPU throughput mode (server/streams.py) leaves its jobs to the main device thread and does
    not count them towards turning itself on."""
    from fewstep.server.engine import Job

    engine = server.engine
    for name in ("flux-student", "flux-teacher", "sdxl-turbo"):
        job = Job(model=name, requested=name, prompt=PROMPT, steps=1, guidance=None, seeds=[0])
        assert not engine._streamable(job), name
