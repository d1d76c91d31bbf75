"""Server settings: flags > FEWSTEP_* environment variables > YAML file > defaults. Parsed once, passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, InitSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from fewstep.errors import UsageError
from fewstep.yamlfile import read_mapping


class ServeSettings(BaseSettings):
    """Every server setting, declared once: ``fewstep serve`` derives a flag from each field (--max-batch for
    max_batch, --api-key for api_keys, --no-warmup for warmup), FEWSTEP_<NAME> sets it from the environment and
    a YAML file (--config) may hold any of them. A new setting is a new field here, nothing else."""

    model_config = SettingsConfigDict(env_prefix="FEWSTEP_", extra="forbid", protected_namespaces=())

    models: Path = Field(
        default=Path("zoo"),
        description="directory of checkpoint directories to serve (default: FEWSTEP_MODELS, else ./zoo)",
    )
    host: str = Field(default="127.0.0.1", description="bind address")
    port: int = Field(default=8000, ge=0, le=65535, description="port")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = CUDA when available")
    kernels: Literal["auto", "triton", "torch"] = Field(
        default="auto", description="attention/norm/modulation kernels: auto = Triton on CUDA, PyTorch elsewhere"
    )
    default_model: str | None = Field(
        default=None,
        description="model for requests that name none (default: the student serving the fewest "
        "steps, else the teacher)",
    )
    max_batch: int = Field(default=8, ge=1, le=256, description="images per batch")
    max_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="how long an idle device waits for a batch to fill (a backlog of half a batch or more: counted "
        "from its oldest arrival)",
    )
    queue_size: int = Field(default=64, ge=1, description="requests waiting; more are answered 429")
    max_queued_work_s: float = Field(
        default=10.0,
        gt=0,
        description="estimated device seconds of queued work (images × steps × the model's "
        "measured cost); a request that would exceed it is answered 429",
    )
    request_timeout_s: float = Field(default=60.0, gt=0, description="longer requests are answered 504")
    max_n: int = Field(default=8, ge=1, le=64, description="images per request")
    max_prompt_chars: int = Field(default=300, ge=1, description="longest prompt accepted")
    max_teacher_steps: int = Field(default=100, ge=1, description="the largest step count a request may ask for")
    max_body_bytes: int = Field(default=65_536, ge=1024, description="largest request body")
    png_compress_level: int = Field(
        default=1,
        ge=0,
        le=9,
        description="zlib level of served PNGs: 1 encodes a small image in about half the time of 6 for about 8% "
        "more bytes (benchmarks/png.py)",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="require 'Authorization: Bearer KEY' on /v1 (flag repeatable; FEWSTEP_API_KEYS is comma-separated)",
    )
    default_latency_slo_ms: float = Field(
        default=1000.0, gt=0, description='the latency target of a steps: "auto" request that names none'
    )
    quality_gate: bool = Field(
        default=False,
        description="score student images with the student's gate (fewstep calibrate-gate) and have the "
        "teacher regenerate those under its threshold; a request's quality_gate overrides it",
    )
    step_scheduling: bool = Field(
        default=True,
        description="run many-step (teacher) batches one step at a time, student batches between their steps "
        "and new requests joining at step boundaries (--no-step-scheduling: each batch runs to its end)",
    )
    breaker_threshold: int = Field(default=3, ge=1, description="consecutive student failures that open its circuit")
    breaker_cooldown_s: float = Field(default=30.0, ge=0, description="how long an open circuit stays open")
    warmup: bool = Field(default=True, description="run every model once before /readyz says ready")
    threads: int = Field(default=0, ge=0, description="torch CPU threads; 0 = torch's default")
    cpu_streams: int = Field(
        default=0,
        ge=0,
        le=64,
        description="CPU throughput mode: while the queue holds a full batch for each, this many batches run at once, "
        "each on its share of the threads; 0 = 2 on a CPU with an even number of threads (else 1), 1 = off "
        "(GPUs: always 1)",
    )
    cpu_split_images: int = Field(
        default=12,
        ge=0,
        description="CPU streams (cpu_streams > 1) outside throughput mode: a whole batch of at least this many "
        "images per stream runs split over the streams, each part single-threaded at once (one OpenMP team over "
        "every core pays a barrier per op; benchmarks/split.py); 0 = never split",
    )
    cpu_graphs: bool = Field(
        default=True,
        description="native models on a CPU: the transformer runs as frozen TorchScript graphs, which hold no GIL "
        "while they run (models/graphs.py; benchmarks/gil.py); false = eager",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="log level")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After of 429 and 503 answers")
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a connection whose request headers have not "
        "all arrived this long after it opened (or after its last response) is closed",
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a request body that has not all arrived this "
        "long after its headers is answered 408 and its connection closed",
    )
    drain_grace_s: float = Field(
        default=5.0,
        ge=0,
        description="after SIGTERM: how long /readyz says 503 while "
        "requests are still served (with Connection: close) before the listener closes",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="after SIGTERM: the deadline for in-flight work; then the process exits 0 whatever clients do",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v


def load_settings(config_file: str | Path | None = None, **flags: Any) -> ServeSettings:
    """Settings from (in priority order) flags, FEWSTEP_* variables, the YAML file, defaults."""
    file_values: dict[str, Any] = read_mapping(config_file) if config_file is not None else {}
    flags = {k: v for k, v in flags.items() if v is not None}

    class _Settings(ServeSettings):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ):
            return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=file_values)

    try:
        return ServeSettings.model_validate(_Settings(**flags).model_dump())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise UsageError(f"setting {where}: {first['msg']}") from None
    except SettingsError as e:
        raise UsageError(str(e)) from None
