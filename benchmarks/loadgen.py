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
