"""One error shape on every route: OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

Bad input is a 4xx naming the field, never a 5xx and never an echo of a long value: messages quote at most a
short prefix of what the client sent (``quote``). A bug is a 500 in the same shape, without a stack trace.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fewstep.server.metrics import Metrics

log = logging.getLogger("fewstep.server")
QUOTE_LIMIT = 64


class APIError(StarletteHTTPException):
    """An answer in the error shape. A Starlette HTTPException, so FastAPI passes it through body parsing."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status, message, headers)
        self.message, self.type, self.param, self.code = message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status_code, self.message, self.type, self.param, self.code, self.headers)


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """repr(value) cut to ``limit`` characters: enough to recognise, never a 5 KB echo."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(errors) -> APIError:
    """pydantic's first error -> a 400 naming the field (pydantic's messages do not include the input)."""
    first = errors[0]
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")[:QUOTE_LIMIT] or None  # a key is input
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif first.get("type") in ("model_attributes_type", "model_type", "dict_type") and not field:
        msg = "request body must be a JSON object"
    return APIError(400, f"{field}: {msg}" if field else msg, param=field, code="invalid_value")


def install(app: FastAPI, metrics: Metrics) -> None:
    """The exception handlers that put every error in the one shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.error(exc.code or exc.type)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        e = validation_error(exc.errors())
        metrics.error(e.code)
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        metrics.error(code)
        return error_response(exc.status_code, str(exc.detail), code=code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: say so, without a stack trace
        log.exception("unhandled error")
        metrics.error("internal")
        return error_response(500, "internal error", "server_error", code="internal_error")
