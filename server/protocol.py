"""Request and response types of the HTTP API (pydantic), so /openapi.json describes every body.

Strict types: an integer field takes a JSON integer only (not true, "4" or 4.0), a number field a JSON number
(not a string or a boolean). Limits that depend on settings are checked by the serving object, which names the
offending field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # no slashes: a model is a name, never a path
MAX_SEED = 2**53 - 1  # exact in JSON numbers everywhere
OutputFormat = Literal["png", "jpeg", "webp"]


STRICT = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)


class GenerateRequest(BaseModel):
    model_config = STRICT
    prompt: str = Field(max_length=100_000)
    # "auto": the most steps (student 1-4, or the teacher) predicted to finish within latency_slo_ms
    steps: int | str | None = None
    latency_slo_ms: float | None = Field(default=None, gt=0, le=3_600_000)  # with steps "auto" (default: the server's)
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    guidance: float | None = Field(default=None, ge=0, le=50)
    model: str | None = Field(default=None, pattern=MODEL_NAME)
    quality: Literal["teacher"] | None = None  # "teacher": skip the student
    output_format: OutputFormat = "png"
    # the image size; either left out takes the model's default (GET /v1/models lists each model's sizes)
    width: int | None = Field(default=None, ge=1, le=16384)
    height: int | None = Field(default=None, ge=1, le=16384)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, str) and v != "auto" or isinstance(v, int) and v < 1:
            raise ValueError('must be an integer >= 1 or "auto"')
        return v


class GeneratedImage(BaseModel):
    b64: str
    seed: int
    format: OutputFormat


class Timings(BaseModel):
    queue_ms: float
    inference_ms: float
    encode_ms: float
    total_ms: float


class AutoCandidate(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    steps: int
    predicted_ms: float


class AutoChoice(BaseModel):
    """What steps: "auto" chose: the target, the chosen candidate's predicted latency, every candidate (best
    first)."""

    latency_slo_ms: float
    predicted_ms: float
    candidates: list[AutoCandidate]


class GenerateResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    images: list[GeneratedImage]
    model: str  # what was asked for
    served_by: str  # who generated the images
    steps: int
    fallback_reason: str | None
    batch_images: int
    timings: Timings
    auto: AutoChoice | None = None  # with steps "auto"


class ImagesRequest(BaseModel):
    """OpenAI's POST /v1/images/generations body."""

    model_config = STRICT
    prompt: str = Field(max_length=100_000)
    model: str | None = Field(default=None, pattern=MODEL_NAME)
    n: int = Field(default=1, ge=1)
    size: str | None = Field(default=None, max_length=32)
    quality: Literal["auto", "low", "medium", "high", "standard", "hd", "teacher"] | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["auto", "opaque", "transparent"] | None = None
    moderation: Literal["auto", "low"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: str | None = Field(default=None, max_length=256)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)  # an extension: OpenAI has no seed


# quality -> student step count; "teacher" goes to the teacher at its default steps (docs/api.md)
QUALITY_STEPS: dict[str, int | None] = {
    "low": 1,
    "auto": None,
    "standard": 2,
    "medium": 2,
    "high": 4,
    "hd": 4,
    "teacher": None,
}
