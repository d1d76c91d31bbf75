"""Server settings: flags > FEWSTEP_* environment variables > YAML file > defaults. Parsed once, passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, InitSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from fewstep.yamlfile import read_mapping


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEWSTEP_", extra="forbid", protected_namespaces=())

    # --models, else FEWSTEP_MODELS, else ./zoo (a fresh checkout serves its shipped models)
    models: Path = Field(default=Path("zoo"), description="directory of checkpoint directories to serve")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    kernels: Literal["auto", "triton", "torch"] = "auto"  # FEWSTEP_KERNELS; auto = Triton on CUDA (kernels/)
    default_model: str | None = None  # default: the student serving the fewest steps, else the teacher
    max_batch: int = Field(default=8, ge=1, le=256)  # images per batch
    max_wait_ms: float = Field(default=5.0, ge=0)  # how long the batcher waits to fill a batch
    queue_size: int = Field(default=64, ge=1)  # requests waiting; more -> 429
    request_timeout_s: float = Field(default=60.0, gt=0)  # -> 504
    max_n: int = Field(default=8, ge=1, le=64)
    max_prompt_chars: int = Field(default=300, ge=1)
    max_teacher_steps: int = Field(default=100, ge=1)  # the largest step count a request may ask for
    max_body_bytes: int = Field(default=65_536, ge=1024)
    # non-empty: /v1 needs "Authorization: Bearer KEY"; FEWSTEP_API_KEYS is comma-separated
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    breaker_threshold: int = Field(default=3, ge=1)  # consecutive student failures that open its circuit
    breaker_cooldown_s: float = Field(default=30.0, ge=0)
    warmup: bool = True
    threads: int = Field(default=0, ge=0)  # torch CPU threads; 0 = torch's default
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    retry_after_s: int = Field(default=1, ge=1)

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
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=file_values)

    try:
        return ServeSettings.model_validate(_Settings(**flags).model_dump())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ValueError(f"setting {where}: {first['msg']}") from None
    except SettingsError as e:
        raise ValueError(str(e)) from None
