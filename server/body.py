"""Request bodies: JSON parsed with limits the standard parser lacks, before pydantic sees it.

``json.loads`` turns 10,000 nested arrays into a RecursionError and a 5,000-digit integer into a ValueError
(Python's integer-conversion limit); both used to escape as 500s, and the connection was reset after them.
Here any body the parser cannot take — nesting, number size, NaN/Infinity, encoding, a key given twice, not
JSON — is a 400 in the error shape, and the connection stays usable. Routes use ``JSONRoute`` so FastAPI's own
body handling (and with it the OpenAPI schema of every request body) stays in place.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fewstep.server.errors import APIError, quote, validation_error

MAX_NUMBER_CHARS = 40  # 2**53 has 16 digits; a seed or a step count never needs more than this


def _number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise APIError(
                400,
                f"a number in the body has {len(text)} characters (at most {MAX_NUMBER_CHARS})",
                code="invalid_json",
            )
        return kind(text)

    return parse


def _constant(text: str) -> Any:
    raise APIError(400, f"{text} is not a JSON number", code="invalid_json")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members; a key given twice is an error (parsers disagree on which one wins)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise APIError(400, f"request body gives the key {quote(dup)} twice", code="invalid_json")
    return out


def loads(body: bytes) -> Any:
    """Parse a request body, or raise a 400 APIError saying what was wrong with it."""
    try:
        return json.loads(
            body,
            parse_int=_number(int),
            parse_float=_number(float),
            parse_constant=_constant,
            object_pairs_hook=_unique,
        )
    except RecursionError:
        raise APIError(400, "request body nests arrays or objects too deeply", code="invalid_json") from None
    except UnicodeDecodeError:
        raise APIError(400, "request body is not UTF-8", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON ({e.msg} at {e.pos})", code="invalid_json") from None


class JSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """FastAPI's route with the safe parser, and a 415 for bodies that are not JSON. A body without a
    content-type is read as JSON (curl -d and older SDKs send none).

    A route whose parameters are one pydantic body and the Request (the generation routes) is called directly:
    the body parsed here and validated by its model, errors in the shape FastAPI's would take. FastAPI's own
    dependency solving for the same two parameters was about a fifth of the request path's event-loop time
    (docs/performance.md); the route is still declared with its model, so /openapi.json describes its body."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        direct = _direct_call(self)

        async def route_handler(request: Request) -> Response:
            ctype = request.headers.get("content-type")
            if ctype is None:
                request.scope["headers"] = [*request.scope["headers"], (b"content-type", b"application/json")]
            elif "json" not in ctype.lower():
                raise APIError(
                    415, f"content-type must be application/json, not {quote(ctype)}", code="unsupported_media_type"
                )
            request = JSONRequest(request.scope, request.receive)
            if direct is None:
                return await handler(request)
            model, body_name, request_name = direct
            try:
                raw = await request.body()
            except ClientDisconnect:  # a client event (under fewstep serve, lifecycle.Deadlines answers for it)
                raise APIError(499, "client disconnected", code="client_disconnected") from None
            except StarletteHTTPException:  # BodyLimit's 413
                raise
            except Exception as e:  # as FastAPI answers an error while reading a body
                raise StarletteHTTPException(400, "There was an error parsing the body") from e
            if not raw:
                raise validation_error([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
            try:  # FastAPI parses JSON only for application/json or application/*+json; others stay bytes
                body = model.model_validate(loads(raw) if _is_json(request.headers["content-type"]) else raw)
            except ValidationError as e:
                raise validation_error(e.errors(include_url=False)) from None
            response = await self.endpoint(**{body_name: body, request_name: request})
            if not isinstance(response, Response):  # response_model serialisation is FastAPI's: not done here
                raise TypeError(f"{self.endpoint.__name__} is called directly and must return a Response")
            return response

        return route_handler


def _direct_call(route: APIRoute) -> tuple[type[BaseModel], str, str] | None:
    """(body model, its parameter's name, the Request parameter's name) when the endpoint takes exactly those,
    plainly annotated and without defaults (no Body(embed=...), Annotated or optional body); else None."""
    params = inspect.signature(route.endpoint).parameters
    hints = typing.get_type_hints(route.endpoint, include_extras=True)
    models = [n for n in params if isinstance(hints.get(n), type) and issubclass(hints[n], BaseModel)]
    requests = [n for n in params if hints.get(n) is Request]
    plain = all(p.default is inspect.Parameter.empty for p in params.values())
    if len(params) != 2 or len(models) != 1 or len(requests) != 1 or not plain or route.dependencies:
        return None
    return hints[models[0]], models[0], requests[0]


def _is_json(content_type: str) -> bool:
    """FastAPI's rule for a JSON body: application/json or application/*+json, parameters ignored."""
    kind, _, subtype = content_type.split(";")[0].strip().lower().partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))
