"""A small asyncio HTTP/1.1 load generator shared by the benchmarks: keep-alive sockets with TCP_NODELAY, far
cheaper per request than httpx, so that on a 2-core machine the clients leave the cores to the server they
measure (an httpx client at 32 concurrent requests took about a core of its own)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

HOST = "127.0.0.1"  # loopback only


def raw_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {HOST}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawConnection:
    """One blocking keep-alive connection for sequential requests: the latency rows' client, whose own cost per
    request is a send and a few receives (httpx adds about 4 ms per request on a 2-core VM)."""

    TIMEOUT_S = 300.0  # a hung server fails the benchmark instead of blocking it

    def __init__(self, port: int, headers: dict[str, str] | None = None, path: str = "/v1/generate"):
        self.port, self.path = port, path
        self.headers = {**(headers or {}), "content-type": "application/json"}
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection((HOST, self.port), timeout=self.TIMEOUT_S)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        return self.sock

    def post(self, payload: dict) -> tuple[int, bytes]:
        """-> (status, body). Only Content-Length framing (what uvicorn sends for these responses)."""
        self._connect().sendall(raw_request(self.port, "POST", self.path, self.headers, json.dumps(payload).encode()))
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if "content-length" not in fields:
            raise ConnectionError(f"a response without Content-Length ({lines[0]!r}): not supported here")
        length = int(fields["content-length"])
        while len(self.buf) < length:
            self._recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        if fields.get("connection", "").lower() == "close":
            self.close()  # the next request opens a new connection
        return int(lines[0].split()[1]), body

    def _recv(self) -> None:
        data = self._connect().recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RawPool:
    """POSTs one fixed JSON body over a pool of keep-alive connections."""

    MAX_IDLE_S = 2.0  # a connection idle longer is dropped, not reused: the server may be closing it (keep-alive)

    def __init__(self, port: int, payload: dict, headers: dict[str, str] | None = None, path: str = "/v1/generate"):
        self.port, self.idle, self.opened = port, [], 0
        headers = {**(headers or {}), "content-type": "application/json"}
        self.request_bytes = raw_request(port, "POST", path, headers, json.dumps(payload).encode())

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self.idle:
            reader, writer, since = self.idle.pop()
            if time.perf_counter() - since < self.MAX_IDLE_S and not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        reader, writer = await asyncio.open_connection(HOST, self.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.opened += 1
        return reader, writer

    async def post(self) -> tuple[int, dict[str, str]]:
        """-> (status, lower-cased headers); the body is read and dropped."""
        reader, writer = await self._connection()
        try:
            writer.write(self.request_bytes)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer, time.perf_counter()))
        return int(lines[0].split()[1]), headers

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()


class _Exchange(asyncio.Protocol):
    """One keep-alive connection of ``OpenLoop``: callbacks only, no task or stream per request."""

    def __init__(self, owner: OpenLoop):
        self.owner, self.transport, self.buf = owner, None, b""
        self.sent_at: float | None = None  # while a request is out
        self.idle_since = 0.0

    def connection_made(self, transport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport

    def send(self, arrival: float) -> None:
        """``arrival``: when the request was due; its latency and its patience count from then (a connect
        included, as before the request could be written)."""
        self.sent_at = arrival
        self.transport.write(self.owner.request_bytes)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.sent_at is None:
            return
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(fields.get("content-length", "0"))
        if len(self.buf) < end + 4 + length:
            return
        self.buf = self.buf[end + 4 + length :]
        sent, self.sent_at = self.sent_at, None
        close = fields.get("connection", "").lower() == "close"
        if close:
            self.transport.close()
        self.owner.done(self, int(lines[0].split()[1]), fields, sent, reusable=not close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sent_at is not None:  # closed with a request out
            self.sent_at = None
            self.owner.failed(self, type(exc).__name__ if exc else "IncompleteReadError")
        self.owner.forget(self)


class OpenLoop:
    """Open-loop arrivals of one fixed POST: every 1/rate s for ``seconds`` whatever the server answers, at most
    ``cap`` in flight, each given up after ``patience`` s. Built on protocol callbacks (no task, stream or timer per
    request), so that at thousands of arrivals per second the generator takes little of the cores it shares with
    the server it measures; arrivals due within the same millisecond go out together."""

    TICK_S = 0.001

    def __init__(self, port: int, payload: dict, headers: dict[str, str] | None = None, path: str = "/v1/generate"):
        self.port = port
        headers = {**(headers or {}), "content-type": "application/json"}
        self.request_bytes = raw_request(port, "POST", path, headers, json.dumps(payload).encode())
        self.idle: list[_Exchange] = []
        self.busy: set[_Exchange] = set()
        self.connecting = 0
        self.on_answer = None  # (status, lower-cased headers, seconds) -> None
        self.on_failure = None  # (error name) -> None

    def done(self, ex: _Exchange, status: int, fields: dict[str, str], sent: float, reusable: bool) -> None:
        self.busy.discard(ex)
        now = time.perf_counter()
        if reusable:
            ex.idle_since = now
            self.idle.append(ex)
        self.on_answer(status, fields, now - sent)

    def failed(self, ex: _Exchange, error: str) -> None:
        self.busy.discard(ex)
        self.on_failure(error)

    def forget(self, ex: _Exchange) -> None:
        """Its connection has closed."""
        self.busy.discard(ex)
        if ex in self.idle:
            self.idle.remove(ex)

    async def _open_and_send(self, arrival: float, patience: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            connect = loop.create_connection(lambda: _Exchange(self), HOST, self.port)
            _, ex = await asyncio.wait_for(connect, max(0.0, arrival + patience - time.perf_counter()))
        except (OSError, asyncio.TimeoutError) as e:
            self.on_failure("TimeoutError" if isinstance(e, asyncio.TimeoutError) else type(e).__name__)
            return
        except asyncio.CancelledError:  # still connecting when the run ended
            self.on_failure("TimeoutError")
            raise
        finally:
            self.connecting -= 1
        self.busy.add(ex)
        ex.send(arrival)

    def _dispatch(self, arrival: float, patience: float, tasks: set[asyncio.Task]) -> None:
        while self.idle and time.perf_counter() - self.idle[-1].idle_since > RawPool.MAX_IDLE_S:
            self.idle.pop().transport.close()  # the server may be closing it (keep-alive): a reset if reused
        if self.idle:
            ex = self.idle.pop()
            self.busy.add(ex)
            ex.send(arrival)
        else:
            self.connecting += 1
            task = asyncio.get_running_loop().create_task(self._open_and_send(arrival, patience))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def _expire(self, patience: float) -> None:
        now = time.perf_counter()
        for ex in [ex for ex in self.busy if ex.sent_at is not None and now - ex.sent_at > patience]:
            ex.sent_at = None  # counted here, not again when its connection is lost
            self.busy.discard(ex)
            ex.transport.abort()
            self.on_failure("TimeoutError")

    async def run(self, rate: float, seconds: float, cap: int, patience: float) -> tuple[int, int, float]:
        """-> (offered, not sent because ``cap`` were in flight, seconds from the first arrival to the last
        answer); answers and failures go to ``on_answer`` and ``on_failure``."""
        total, offered, not_sent, tasks = int(rate * seconds), 0, 0, set()
        start = time.perf_counter()
        while offered < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            for _ in range(due - offered):
                arrival = start + offered / rate
                offered += 1
                if len(self.busy) + self.connecting >= cap:
                    not_sent += 1
                else:
                    self._dispatch(arrival, patience, tasks)
            self._expire(patience)
            await asyncio.sleep(self.TICK_S)
        deadline = time.perf_counter() + patience + 1
        while (self.busy or self.connecting) and time.perf_counter() < deadline:
            self._expire(patience)
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
        for task in tasks:  # connects still pending (bounded by their patience): given up, and counted
            task.cancel()
        for ex in [*self.idle, *self.busy]:
            ex.transport.close()
        return offered, not_sent, elapsed
