"""Server settings: flags > FEWSTEP_* environment variables > YAML file > defaults. Parsed once, passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

from fewstep.paths import zoo_dir


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEWSTEP_", extra="forbid", protected_namespaces=())

    models: Path = Field(default_factory=zoo_dir, description="directory of checkpoint directories to serve")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    default_model: str | None = None  # default: the student serving the fewest steps, else the teacher
    max_batch: int = Field(default=8, ge=1, le=256)  # images per batch
    max_wait_ms: float = Field(default=5.0, ge=0)  # how long the batcher waits to fill a batch
    queue_size: int = Field(default=64, ge=1)  # requests waiting; more -> 429
    request_timeout_s: float = Field(default=60.0, gt=0)  # -> 504
    max_n: int = Field(default=8, ge=1, le=64)
    max_prompt_chars: int = Field(default=300, ge=1)
    max_teacher_steps: int = Field(default=100, ge=1)  # the largest step count a request may ask for
    max_body_bytes: int = Field(default=65_536, ge=1024)
    api_keys: list[str] = Field(default_factory=list)  # non-empty: /v1 needs "Authorization: Bearer KEY"
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
    file_values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file")
        try:
            file_values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not valid YAML: {e}") from None
        if not isinstance(file_values, dict):
            raise ValueError(f"--config {path}: expected a mapping of settings")
    flags = {k: v for k, v in flags.items() if v is not None}

    class _Settings(ServeSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=file_values)

    return ServeSettings.model_validate(_Settings(**flags).model_dump())
