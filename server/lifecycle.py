"""Deadlines for slow clients and a drained shutdown, around the app and inside uvicorn (``fewstep serve``).

- Refusals: ``HeaderDeadline`` answers a saturated engine's 429s itself (server/rejection.py).
- Headers: ``HeaderDeadline`` (uvicorn's h11 protocol with a timer) closes a
  connection whose request headers have not all arrived ``header_timeout_s`` after it opened or after its last
  response (uvicorn has no such timeout, so sockets sending partial headers stayed open for ever). There is no
  request yet, so there is nothing to answer.
- Bodies: ``Deadlines`` answers 408 (``Connection: close``) when a body has not all arrived ``body_timeout_s``
  after its headers. A client that disconnects mid-body is a client event: one info line and
  ``fewstep_errors_total{type="client_disconnected"}``, never an unhandled error.
- Disconnects while a request waits: ``HeaderDeadline`` gives each request a list under
  ``scope["extensions"]["fewstep.disconnect"]`` (serving.DISCONNECT) and calls what its handler put there when the
  connection is lost, so a waiting request needs no task of its own to notice.
- Shutdown: ``DrainingServer`` turns SIGTERM into a drain. At once /readyz answers 503 and every response carries
  ``Connection: close`` (pooled keep-alive clients reconnect elsewhere instead of meeting a reset); after
  ``drain_grace_s`` the listener closes (a connection with no request yet gets UNUSED_GRACE_S to send one, rather
  than a reset); requests in flight finish until ``drain_timeout_s`` after the signal, when
  those left are answered 503; then the process exits 0. A second signal exits at once.

docs/deploy.md ("Shutdown and slow clients") has the timeline and the Kubernetes values that fit it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from types import FrameType

import anyio
import h11
import uvicorn
from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from fewstep.server.rejection import EarlyRejection, RefusingConnection
from fewstep.server.serving import DISCONNECT
from fewstep.server.settings import ServeSettings

log = logging.getLogger("fewstep.server")
UNUSED_GRACE_S = 0.5  # at shutdown, how long a connection that has had no request yet may still send one


def build_server(app: FastAPI, settings: ServeSettings) -> DrainingServer:
    """uvicorn serving ``app`` (from ``create_app``) with the deadlines and the drain; ``.run()`` it."""
    wrapped = Deadlines(app, settings)
    config = uvicorn.Config(
        wrapped,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # refusals under overload are answered by the protocol itself (server/rejection.py)
        http=HeaderDeadline.configure(
            settings.header_timeout_s, EarlyRejection(app.state.engine, settings, app.state.metrics)
        ),
        loop="asyncio",  # the drain and the deadlines are tested on asyncio's loop
        access_log=False,  # RequestContext logs every request once, with its id, status and time
        ws="none",  # no WebSocket routes; an upgrade would bypass the header deadline's bookkeeping
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),  # a shutdown without a signal
    )
    return DrainingServer(config, wrapped, settings)


class _Abandoned(BaseException):
    """Raised from ``receive`` to unwind the app when its request body will not come. A BaseException, so the
    app's ``except Exception`` handlers (FastAPI turns any error while reading a body into a 400, the app's
    catch-all into a logged 500) let it through to ``Deadlines``, which answers for it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # "body_timeout" | "client_disconnected"


class Deadlines:
    """ASGI wrapper: the body deadline, client disconnects mid-body, and the drain (``Connection: close`` on every
    response while draining; requests still running at the drain deadline answered 503)."""

    def __init__(self, app: FastAPI, settings: ServeSettings):
        self.app, self.settings = app, settings
        self.drain_deadline = math.inf  # anyio.current_time() at which requests in flight are cut short
        self._running: set[anyio.CancelScope] = set()

    @property
    def engine(self):
        return self.app.state.engine

    def drain_by(self, deadline: float) -> None:
        """Requests running now or later stop at ``deadline`` (anyio.current_time())."""
        self.drain_deadline = deadline
        for scope in self._running:
            scope.deadline = min(scope.deadline, deadline)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_deadline = anyio.current_time() + self.settings.body_timeout_s  # the headers have just arrived
        body_done, started = False, False

        async def receive_in_time() -> Message:
            nonlocal body_done
            if body_done:  # after the body, receive only waits for a disconnect: no deadline
                return await receive()
            with anyio.CancelScope(deadline=body_deadline) as wait:
                message = await receive()
            if wait.cancelled_caught:
                raise _Abandoned("body_timeout")
            if message["type"] == "http.disconnect":
                raise _Abandoned("client_disconnected")
            body_done = not message.get("more_body", False)
            return message

        async def send_closing_while_draining(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.engine.draining:  # h11 closes the connection after this response; the client reconnects
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        metrics = self.app.state.metrics
        what = f"{scope.get('method')} {scope.get('path')}"
        try:
            with anyio.CancelScope(deadline=self.drain_deadline) as run:
                self._running.add(run)
                try:
                    await self.app(scope, receive_in_time, send_closing_while_draining)
                finally:
                    self._running.discard(run)
        except _Abandoned as e:
            metrics.error(e.reason)
            if e.reason == "client_disconnected":
                log.info("%s: the client disconnected before sending all of its body", what)
                return
            log.info("%s: the body did not arrive within %s s: 408", what, self.settings.body_timeout_s)
            if started:  # cannot answer any more: let uvicorn close the connection
                raise
            message = f"the request body did not arrive within {self.settings.body_timeout_s} s"
            return await _error(scope, send, 408, message, "invalid_request_error", "body_timeout")
        if run.cancelled_caught:
            metrics.error("shutting_down")
            log.warning("%s: still running at the drain deadline: 503", what)
            if not started:
                message, retry = "the server is shutting down; retry", str(self.settings.retry_after_s)
                await _error(scope, send, 503, message, "server_error", "shutting_down", {"retry-after": retry})


async def _error(
    scope: Scope, send: Send, status: int, message: str, type_: str, code: str, headers: dict | None = None
) -> None:
    """An answer in the project's error shape that also ends the connection (its request was not all read)."""
    headers = {"connection": "close", **(headers or {})}
    if rid := scope.get("state", {}).get("request_id"):  # set by the app's RequestContext
        headers["x-request-id"] = rid
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}

    async def no_receive() -> Message:  # a JSONResponse never reads
        return {"type": "http.disconnect"}

    await JSONResponse(body, status, headers)(scope, no_receive, send)


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a header deadline: a timer starts when the connection opens and again when a
    response completes (keep-alive), and stops when a request's headers are complete (uvicorn then starts a new
    request cycle); if it fires first, the connection is closed.

    h11, not httptools: uvicorn's C parser was tried and rejected. It parsed requests faster (overload goodput
    81% against 74-79% of capacity) but accepted a 60 KB header, 5,000 headers and an HTTP/0.9 request line, and
    reset a pooled connection in a drain (docs/reliability.md); h11 answers those with 400/431 and closes cleanly.
    """

    header_timeout_s = 10.0
    rejection: EarlyRejection | None = None  # when set, the 429s of a saturated engine are answered here

    @classmethod
    def configure(cls, seconds: float, rejection: EarlyRejection | None = None) -> type[HeaderDeadline]:
        return type(cls.__name__, (cls,), {"header_timeout_s": seconds, "rejection": rejection})

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.rejection is not None:
            self.conn = RefusingConnection(self, self.rejection, self.config.h11_max_incomplete_event_size)

    _timer: asyncio.TimerHandle | None = None  # set while waiting for headers
    _waiting_since: object = None  # the request cycle current when the wait began (None: a fresh connection)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._wait_for_headers()

    def data_received(self, data: bytes) -> None:
        if self.rejection is not None and not (data := self._refuse_at_the_wire(data)):
            return
        super().data_received(data)
        if self._timer is not None and self.cycle is not self._waiting_since:  # a new request's headers are in
            self._stop_timer()

    def _refuse_at_the_wire(self, data: bytes) -> bytes:
        """Answers the refused whole requests at the front of ``data`` before h11 sees them (server/rejection.py)
        and returns the rest. Only between requests (h11 idle on both sides, nothing buffered): otherwise the
        bytes belong to a request h11 is reading."""
        conn, start = self.conn, 0
        while (
            conn.our_state is h11.IDLE
            and conn.their_state is h11.IDLE
            and not conn.trailing_data[0]
            and not self.flow.write_paused  # a client that does not read its refusals: h11's path waits
            and not self.transport.is_closing()
            and (refused := self.rejection.at_the_wire(data, start)) is not None
        ):
            response, start = refused
            self.transport.write(response)
            self.server_state.total_requests += 1
        if start:  # as after any response: the keep-alive and header timers start again
            self._unset_keepalive_if_required()
            keep_alive = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
            self.timeout_keep_alive_task = keep_alive
            self._wait_for_headers()
        return data[start:] if start else data

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self.cycle is not None:  # a new request: its task has not run yet
            self.cycle.scope.setdefault("extensions", {})[DISCONNECT] = []

    def on_response_complete(self) -> None:
        done = self.cycle
        super().on_response_complete()  # may parse a pipelined request, which starts a new cycle
        if self.cycle is done and not self.transport.is_closing():
            self._wait_for_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._stop_timer()
        if self.cycle is not None and self.cycle.disconnected:  # mid-request: its handler stops waiting for a result
            for callback in self.cycle.scope.get("extensions", {}).get(DISCONNECT, ()):
                callback()

    def shutdown(self) -> None:
        """uvicorn closes every idle connection once the listener has closed. One that has not had a request yet
        may have been accepted a moment ago with its first request on the way, and closing it unread resets that
        client: such a connection gets up to UNUSED_GRACE_S to send it, which is answered (with ``Connection:
        close``, as every response of a drain), and is closed after that if nothing came."""
        if self.cycle is None and not self.transport.is_closing():
            self.loop.call_later(UNUSED_GRACE_S, self._close_if_unused)
            return
        super().shutdown()

    def _close_if_unused(self) -> None:
        if not self.transport.is_closing():  # idle: closed; a request in flight: closed after its response
            super().shutdown()

    def _wait_for_headers(self) -> None:
        self._stop_timer()
        self._waiting_since = self.cycle
        self._timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            client = "{}:{}".format(*self.client) if self.client else "a client"
            log.info("closed %s's connection: no complete request headers within %s s", client, self.header_timeout_s)
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM as a drain (see the module docstring) and exit status 0 after it.

    The signal handler only sets flags (it may interrupt anything); ``on_tick``, which uvicorn's main loop calls
    every 0.1 s, does the rest on the event loop. SIGINT (Ctrl+C) drains too, without the grace period: there
    is no load balancer to tell."""

    def __init__(self, config: uvicorn.Config, deadlines: Deadlines, settings: ServeSettings):
        super().__init__(config)
        self.deadlines, self.settings = deadlines, settings
        self.signalled: tuple[int, float] | None = None  # (signal, time.monotonic()) of the first signal
        self.drain_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it records the signal and re-raises it after shutdown, so the process ended as killed
        # by SIGTERM (-15). A drain is a clean exit: 0.
        if self.signalled is None:
            self.signalled = (sig, time.monotonic())
            self.deadlines.engine.draining = True  # /readyz answers 503 from now on
        else:  # a second signal: stop now, whatever is in flight
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.signalled is not None and not self.should_exit:
            sig, at = self.signalled
            left = at + self.settings.drain_timeout_s - time.monotonic()
            grace = self.settings.drain_grace_s if sig == signal.SIGTERM else 0.0
            if not self.drain_started:
                self.drain_started = True
                self.deadlines.drain_by(anyio.current_time() + left)
                log.info(
                    "%s: draining: /readyz says 503; serving with Connection: close for %.1f s, then in-flight "
                    "requests have until %.1f s after the signal",
                    signal.Signals(sig).name,
                    min(grace, self.settings.drain_timeout_s),
                    self.settings.drain_timeout_s,
                )
            if time.monotonic() >= at + min(grace, self.settings.drain_timeout_s):
                self.should_exit = True  # uvicorn closes the listener and waits for requests in flight
                # Deadlines answers what is left at the deadline; this bounds anything it cannot (a client that
                # does not read its response), after which uvicorn cancels what remains
                self.config.timeout_graceful_shutdown = max(left, 0) + 1  # type: ignore[assignment]
        return await super().on_tick(counter)
