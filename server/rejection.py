"""Refusals answered by the HTTP protocol itself: the 429 of a saturated engine, sent the moment a generation
request's headers are parsed, before an ASGI request cycle, task or middleware exists.

Under overload most requests are refused, and on a small machine every microsecond spent refusing one is taken
from the cores that run the model (docs/reliability.md, "Overload"). The ``Admission`` middleware already refuses
before a body is parsed; this answers the same refusal with less: h11 frames a prepared body, and the request's
body events that follow are skipped by uvicorn's own path for a response sent before the body was read.

Only requests that nothing else must see are answered here: POST to a generation path, HTTP/1.1 with keep-alive,
a Content-Length within the body limit, no Transfer-Encoding or Expect, the right API key (when keys are set), not
while draining, and not while the connection's writes are paused (a client that does not read its answers).
Anything else takes the normal path, where ``Admission`` refuses it the same way.

Two ways in. ``EarlyRejection.at_the_wire`` reads the bytes as they arrive, before h11: a whole request (head and
body) in a strict subset of HTTP/1.1 is answered from a prepared response and never enters h11, whose pure-Python
parsing and framing cost about 0.2 ms a request here, most of a refusal's price (docs/reliability.md, "Overload").
The subset is one h11 frames the same way — an exact request line, RFC 9110 token names, visible-ASCII values,
exactly one Host and one Content-Length, no Transfer-Encoding, Expect, Upgrade or Connection other than
keep-alive, the whole body present — so a request is framed identically on either path; any other byte sequence,
and any connection not idle between requests, is left to h11. There ``RefusingConnection`` answers the request
once h11 has parsed its head (a body still on its way, a head split across reads).
"""

from __future__ import annotations

import json
import re

import h11

from fewstep.server.metrics import Metrics
from fewstep.server.middleware import request_id
from fewstep.server.settings import ServeSettings

PATHS = {b"/v1/generate", b"/v1/images/generations"}
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")  # as RequestContext honours them
_REQUEST_LINES = {b"POST " + p + b" HTTP/1.1" for p in PATHS}  # exact: no query, no absolute form
# name ":" OWS value OWS; a token name (RFC 9110 §5.1), a value of visible ASCII with inner spaces/tabs
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?)[ \t]*")
_NOT_AT_THE_WIRE = {b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"}
MAX_WIRE_HEAD = 8192  # longer heads go to h11 (its own limit is 16 KiB)
MAX_WIRE_FIELDS = 64
BODY = json.dumps(
    {
        "error": {
            "message": "the queue is full; retry later",
            "type": "rate_limit_error",
            "param": None,
            "code": "queue_full",
        }
    }  # fmt: skip
).encode()  # the body Admission's error_response renders


class EarlyRejection:
    """Decides, from a parsed request head, whether the protocol answers 429 itself; counts what it refuses."""

    def __init__(self, engine, settings: ServeSettings, metrics: Metrics):
        self.engine, self.metrics, self.limit = engine, metrics, settings.max_body_bytes
        self.keys = {f"Bearer {k}".encode("latin-1") for k in settings.api_keys}

    def __call__(self, request: h11.Request) -> list[tuple[bytes, bytes]] | None:
        """The 429's headers, or None: the request goes on to the app."""
        if request.method != b"POST" or request.target.partition(b"?")[0] not in PATHS:
            return None
        engine = self.engine
        if engine.draining or not engine.saturated() or request.http_version != b"1.1":
            return None
        length, auth, rid = None, None, b""
        for name, value in request.headers:  # h11 lower-cases the names
            if name == b"content-length":
                length = value
            elif name == b"authorization":
                auth = value
            elif name == b"x-request-id":
                rid = value
            elif name in (b"transfer-encoding", b"expect") or (name == b"connection" and b"close" in value.lower()):
                return None  # chunked, 100-continue (Admission reads such a body), or a close the app must honour
        if length is None or not length.isdigit() or int(length) > self.limit:
            return None
        if self.keys and auth not in self.keys:
            return None  # the app answers 401 first
        return self._refused(rid, "head")

    def _refused(self, rid: bytes, path: str) -> list[tuple[bytes, bytes]]:
        self.metrics.rejected.labels(path=path).inc()
        self.metrics.error("queue_full")
        return [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
            (b"retry-after", str(self.engine.retry_after_s()).encode()),
            (b"x-request-id", rid if _REQUEST_ID.match(rid) else request_id().encode()),
        ]

    def at_the_wire(self, data: bytes, start: int = 0) -> tuple[bytes, int] | None:
        """(the 429's bytes, where the refused request ends in ``data``) when ``data[start:]`` begins with a whole
        request of the strict subset (module docstring) that is refused; else None, and h11 reads it. The caller
        makes sure the connection is idle between requests and its writes are not paused."""
        engine = self.engine
        if not data.startswith(b"POST ", start) or engine.draining or not engine.saturated():
            return None
        head_end = data.find(b"\r\n\r\n", start, start + MAX_WIRE_HEAD)
        if head_end < 0:
            return None
        lines = data[start:head_end].split(b"\r\n")
        if lines[0] not in _REQUEST_LINES or len(lines) > MAX_WIRE_FIELDS + 1:
            return None
        length = host = auth = None
        rid = b""
        for line in lines[1:]:
            field = _FIELD.fullmatch(line)
            if field is None:
                return None
            name, value = field[1].lower(), field[2]
            if name == b"content-length":
                if length is not None:
                    return None
                length = value
            elif name == b"host":
                if host is not None:
                    return None
                host = value
            elif name == b"authorization":
                if auth is not None:
                    return None
                auth = value
            elif name == b"x-request-id":
                rid = value
            elif name in _NOT_AT_THE_WIRE or (name == b"connection" and value.lower() != b"keep-alive"):
                return None
        if host is None or length is None or not length.isdigit() or len(length) > 9 or int(length) > self.limit:
            return None
        end = head_end + 4 + int(length)
        if end > len(data) or (self.keys and auth not in self.keys):
            return None  # the body is still on its way (h11 waits for it), or the app answers 401
        head = b"".join(b"%s: %s\r\n" % kv for kv in self._refused(rid, "wire"))
        return b"HTTP/1.1 429 \r\n" + head + b"\r\n" + BODY, end  # the bytes h11 writes for the same response


class RefusingConnection(h11.Connection):
    """h11's server side, answering the requests ``refuse`` refuses: ``next_event`` never returns them (uvicorn
    never sees them) and the response is written at once; their body events, returned next, are skipped by
    uvicorn because our side of the exchange is already DONE, and the next request starts a new cycle."""

    def __init__(self, protocol, refuse: EarlyRejection, max_incomplete_event_size: int | None = None):
        super().__init__(h11.SERVER, *([] if max_incomplete_event_size is None else [max_incomplete_event_size]))
        self._protocol, self._refuse = protocol, refuse

    def next_event(self):
        while True:
            event = super().next_event()
            if not isinstance(event, h11.Request):
                return event
            # a client that does not read its refusals must not make us buffer them: the normal path waits
            headers = None if self._protocol.flow.write_paused else self._refuse(event)
            if headers is None:
                return event
            out = self.send(h11.Response(status_code=429, headers=headers))
            out += self.send(h11.Data(data=BODY)) + self.send(h11.EndOfMessage())
            self._protocol.transport.write(out)
            self._protocol.on_response_complete()  # keep-alive and header timers, as after any response
