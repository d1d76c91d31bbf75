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
"""

from __future__ import annotations

import json
import re
import uuid

import h11

from fewstep.server.metrics import Metrics
from fewstep.server.settings import ServeSettings

PATHS = {b"/v1/generate", b"/v1/images/generations"}
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")  # as RequestContext honours them
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
        self.metrics.rejected.inc()
        self.metrics.error("queue_full")
        return [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
            (b"retry-after", str(engine.retry_after_s()).encode()),
            (b"x-request-id", rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex.encode()),
        ]


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
