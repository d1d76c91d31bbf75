"""Python SDK for the fewstep server: FewstepClient (sync) and AsyncFewstepClient (asyncio), over httpx.

    from fewstep.clients.sdk import FewstepClient
    with FewstepClient("http://127.0.0.1:8000") as client:
        result = client.generate("a red 7 on black", steps=1, seed=0)
        result.images[0].pil().save("seven.png")
        print(result.served_by, result.fallback_reason, result.timings.total_ms)

429 and 503 answers are retried with exponential backoff that honours Retry-After; every other error is a
FewstepError carrying the server's status, message, param and code.
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx

RETRY_STATUSES = (429, 503)
# small requests go out at once: without TCP_NODELAY, Nagle + delayed ACK cost ~40 ms a request
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class FewstepError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class Image:
    data: bytes
    seed: int
    format: str
    # with the quality gate on: its score, who made it, and "quality_gate" when the teacher regenerated it
    gate_score: float | None = None
    served_by: str | None = None
    fallback_reason: str | None = None

    def pil(self):
        from PIL import Image as PILImage

        return PILImage.open(io.BytesIO(self.data))


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    inference_ms: float
    encode_ms: float
    total_ms: float


@dataclass(frozen=True)
class GenerateResult:
    images: list[Image]
    model: str
    served_by: str
    steps: int
    fallback_reason: str | None
    timings: Timings
    request_id: str | None
    auto: dict[str, Any] | None = None  # steps="auto": the latency target, the prediction, every candidate

    @classmethod
    def from_response(cls, response: httpx.Response) -> GenerateResult:
        body = response.json()
        return cls(
            images=[
                Image(
                    base64.b64decode(im["b64"]),
                    im["seed"],
                    im["format"],
                    im.get("gate_score"),
                    im.get("served_by"),
                    im.get("fallback_reason"),
                )
                for im in body["images"]
            ],  # fmt: skip
            model=body["model"],
            served_by=body["served_by"],
            steps=body["steps"],
            fallback_reason=body["fallback_reason"],
            timings=Timings(**body["timings"]),
            request_id=response.headers.get("x-request-id"),
            auto=body.get("auto"),
        )


def _payload(
    prompt: str,
    steps,
    n,
    seed,
    guidance,
    model,
    output_format,
    quality,
    width,
    height,
    latency_slo_ms=None,
    quality_gate=None,
) -> dict[str, Any]:
    body = {"prompt": prompt, "n": n, "output_format": output_format}
    for key, value in (
        ("steps", steps),
        ("latency_slo_ms", latency_slo_ms),
        ("quality_gate", quality_gate),
        ("seed", seed),
        ("guidance", guidance),
        ("model", model),
        ("quality", quality),
        ("width", width),
        ("height", height),
    ):
        if value is not None:
            body[key] = value
    return body


def _error(response: httpx.Response) -> FewstepError:
    try:
        err = response.json()["error"]
        return FewstepError(response.status_code, err.get("message", ""), err.get("param"), err.get("code"))
    except (ValueError, KeyError, TypeError):
        return FewstepError(response.status_code, response.text[:500])


def _delay(response: httpx.Response, attempt: int, backoff: float) -> float:
    retry_after = response.headers.get("retry-after")
    try:
        return max(float(retry_after), 0.0) if retry_after is not None else backoff * 2**attempt
    except ValueError:
        return backoff * 2**attempt


class FewstepClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
    ):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, headers=headers, transport=httpx.HTTPTransport(socket_options=NODELAY)
        )
        self.max_retries, self.backoff_s = max_retries, backoff_s

    def __enter__(self) -> FewstepClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = self._http.request(method, path, **kw)
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                break
            time.sleep(_delay(response, attempt, self.backoff_s))
        if response.status_code >= 400:
            raise _error(response)
        return response

    def generate(
        self,
        prompt: str,
        steps: int | Literal["auto"] | None = None,
        n: int = 1,
        seed: int | None = None,
        guidance: float | None = None,
        model: str | None = None,
        output_format: str = "png",
        quality: str | None = None,
        width: int | None = None,
        height: int | None = None,
        latency_slo_ms: float | None = None,
        quality_gate: bool | None = None,
    ) -> GenerateResult:
        """``steps="auto"``: the server serves the most steps it predicts to finish within ``latency_slo_ms``
        (default: its own target); ``result.auto`` says what it chose."""
        body = _payload(
            prompt, steps, n, seed, guidance, model, output_format, quality, width, height, latency_slo_ms, quality_gate
        )
        return GenerateResult.from_response(self._request("POST", "/v1/generate", json=body))

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models").json()["data"]

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False


class AsyncFewstepClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
    ):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            headers=headers,
            transport=httpx.AsyncHTTPTransport(socket_options=NODELAY),
        )
        self.max_retries, self.backoff_s = max_retries, backoff_s

    async def __aenter__(self) -> AsyncFewstepClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = await self._http.request(method, path, **kw)
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                break
            await asyncio.sleep(_delay(response, attempt, self.backoff_s))
        if response.status_code >= 400:
            raise _error(response)
        return response

    async def generate(
        self,
        prompt: str,
        steps: int | Literal["auto"] | None = None,
        n: int = 1,
        seed: int | None = None,
        guidance: float | None = None,
        model: str | None = None,
        output_format: str = "png",
        quality: str | None = None,
        width: int | None = None,
        height: int | None = None,
        latency_slo_ms: float | None = None,
        quality_gate: bool | None = None,
    ) -> GenerateResult:
        """``steps="auto"``: the server serves the most steps it predicts to finish within ``latency_slo_ms``
        (default: its own target); ``result.auto`` says what it chose."""
        body = _payload(
            prompt, steps, n, seed, guidance, model, output_format, quality, width, height, latency_slo_ms, quality_gate
        )
        return GenerateResult.from_response(await self._request("POST", "/v1/generate", json=body))

    async def models(self) -> list[dict[str, Any]]:
        return (await self._request("GET", "/v1/models")).json()["data"]
