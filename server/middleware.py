"""Pure ASGI middleware (a BaseHTTPMiddleware would hide client disconnects from the handlers), outermost first:

- ``RequestContext``: X-Request-ID (honoured when well-formed, else generated; always returned), Bearer auth on
  /v1, the in-flight gauge, one log line per request (rejections at debug level: under overload they are most
  of the traffic, and each line costs the cores that run the model);
- ``BodyLimit``: bodies over the limit are refused with 413, whether or not Content-Length is sent;
- ``Admission``: when the engine's queue is full, POSTs to the generation routes are refused with 429 before
  their body is parsed, validated or routed. Under ``fewstep serve`` most such refusals never get here: the
  protocol answers them as soon as their headers are in (server/rejection.py); this refuses the rest.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fewstep.server.errors import APIError, error_response
from fewstep.server.metrics import Metrics
from fewstep.server.settings import ServeSettings

log = logging.getLogger("fewstep.server")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
GENERATION_PATHS = ("/v1/generate", "/v1/images/generations")
CLOSE = {"Connection": "close"}
_IDS = random.Random(os.urandom(32))  # seeded once from the OS; not a secret, just unlikely to repeat


def request_id() -> str:
    """A new request id: 32 random hex characters like a uuid4's, without a getrandom system call per request
    (under overload, one per refusal), and not a counter (which would tell clients the server's volume)."""
    return f"{_IDS.getrandbits(128):032x}"


class RequestContext:
    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.keys = {f"Bearer {k}" for k in settings.api_keys}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid, auth = "", ""
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                rid = v.decode("latin-1")
            elif k == b"authorization":
                auth = v.decode("latin-1")
        rid = rid if _REQUEST_ID.match(rid) else request_id()
        scope.setdefault("state", {})["request_id"] = rid
        status = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        path = scope.get("path", "")
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            if self.keys and path.startswith("/v1/") and auth not in self.keys:
                self.metrics.error("invalid_api_key")
                resp = error_response(
                    401,
                    "missing or invalid API key (Authorization: Bearer KEY)",
                    "authentication_error",
                    code="invalid_api_key",
                )
                return await resp(scope, receive, send_with_id)
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            level = logging.DEBUG if status[0] == 429 else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "request_id=%s method=%s path=%s status=%s ms=%.1f",
                    rid,
                    scope.get("method"),
                    path,
                    status[0],
                    1000 * (time.perf_counter() - start),
                )


class Admission:
    """Refuses generation requests while the engine is saturated, having read (not parsed) their body, so the
    keep-alive connection stays usable and a rejection costs microseconds."""

    def __init__(self, app: ASGIApp, engine, metrics: Metrics):
        self.app, self.engine, self.metrics = app, engine, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        generation = scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
        if not (generation and self.engine.saturated()):
            return await self.app(scope, receive, send)
        more = True
        try:
            while more:  # drain the request body unread; BodyLimit (outside us) bounds its size
                message = await receive()
                more = message.get("more_body", False) and message["type"] == "http.request"
        except APIError as e:
            return await e.response()(scope, receive, send)
        self.metrics.rejected.labels(path="app").inc()
        self.metrics.error("queue_full")
        resp = error_response(
            429,
            "the queue is full; retry later",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(self.engine.retry_after_s())},
        )
        await resp(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and any(k == b"transfer-encoding" for k, _ in headers):
            # both framings at once is how requests are smuggled past proxies (RFC 9112 §6.3): refuse, then close
            message = "request has both Content-Length and Transfer-Encoding"
            resp = error_response(400, message, code="invalid_request", headers=CLOSE)
            return await resp(scope, receive, send)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            # the body is not read: the connection cannot carry another request
            message = f"request body is larger than {self.limit} bytes"
            return await error_response(413, message, code="body_too_large", headers=CLOSE)(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"request body is larger than {self.limit} bytes", code="body_too_large")
            return message

        return await self.app(scope, limited, send)
