"""Reliability benchmark: how `fewstep serve` behaves under hostile input, overload, broken models and shutdown.

    python benchmarks/reliability.py --models zoo --out docs/reliability.md           # full
    python benchmarks/reliability.py --quick --out /tmp/reliability.md                # CI: under ~90 s on 2 cores

Starts `fewstep serve` as subprocesses on loopback ports (127.0.0.1 only) and writes one Markdown table per
section, each row with the measured outcome next to its expectation:

1. Hostile requests: malformed, oversized, ambiguous and abusive requests; each must get a 4xx (never a 5xx),
   leave the keep-alive connection usable and echo at most a short message.
2. Metrics cardinality: /metrics before and after requests naming random models, step counts and paths.
3. Overload: batched capacity (32 closed-loop clients, 1 step), then open-loop arrivals at 2x and 4x it.
4. Fault injection: truncated, corrupt, NaN, unreadable and run-time-failing students beside the zoo's teacher
   and a healthy student; who serves, with what fallback_reason, and what /readyz says.
5. Drain: SIGTERM while keep-alive clients send, with and without a stalled upload and a half-sent header.
6. Slow clients: idle, half-sent, trickling and stalled connections against the header and body deadlines.

Every request loop is bounded in count and time. Each section starts or reuses its own servers and stops them;
an exception in one section becomes an error row in the doc and the next section runs. The exit status is 0
(the doc reports, it does not gate) unless --strict is given: then 1 when any expectation failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from loadgen import HOST, OpenLoop, RawPool, raw_request  # benchmarks/loadgen.py, beside this script

PROMPT = "a red 7 on black"
ONE_STEP = {"prompt": PROMPT, "steps": 1}
MAX_ECHO = 300  # longest acceptable error message / echoed value, in characters
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
ERROR_MARK = "**section error**"  # tests/test_reliability_smoke.py looks for it


@dataclass(frozen=True)
class Mode:
    """How much of each section runs: --quick for CI, the full run for docs/reliability.md."""

    name: str
    metrics_requests: int  # per group of random labels
    capacity_s: float  # closed-loop capacity measurement
    load_s: float  # open-loop window at each overload factor
    patience_s: float  # how long a load-generator request waits for its answer
    inflight_cap: int  # the load generator's cap on requests in flight
    slow_sockets: int  # half-sent headers
    few_sockets: int  # idle, trickling, stalled and vanishing connections each
    timeouts: dict[str, float]  # deadline flags passed to the server when it has them (seconds)

    @property
    def header_s(self) -> float:
        return self.timeouts["header_timeout_s"]

    @property
    def body_s(self) -> float:
        return self.timeouts["body_timeout_s"]

    @property
    def drain_budget_s(self) -> float:
        return self.timeouts["drain_grace_s"] + self.timeouts["drain_timeout_s"]


QUICK = Mode(
    name="quick",
    metrics_requests=100,
    capacity_s=2.0,
    load_s=3.0,
    patience_s=10.0,
    inflight_cap=256,
    slow_sockets=50,
    few_sockets=10,
    timeouts={"header_timeout_s": 2.0, "body_timeout_s": 2.0, "drain_grace_s": 1.0, "drain_timeout_s": 10.0},
)
FULL = Mode(
    name="full",
    metrics_requests=1000,
    capacity_s=10.0,
    load_s=20.0,
    patience_s=30.0,
    inflight_cap=512,
    slow_sockets=200,
    few_sockets=20,
    timeouts={"header_timeout_s": 10.0, "body_timeout_s": 10.0, "drain_grace_s": 5.0, "drain_timeout_s": 30.0},
)


# ---- the server under test ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


_FLAGS: set[str] | None = None


def serve_flags() -> set[str]:
    """The flags this checkout's `fewstep serve` accepts (the deadline flags may not exist yet)."""
    global _FLAGS
    if _FLAGS is None:
        out = subprocess.run(
            [sys.executable, "-m", "fewstep.cli", "serve", "--help"], capture_output=True, text=True, timeout=120
        ).stdout
        _FLAGS = set(re.findall(r"--[a-z][a-z0-9-]*", out))
    return _FLAGS


LINUX = sys.platform.startswith("linux")


def _die_with_parent() -> None:
    """In the server's process before it starts (Linux): SIGTERM it when this script dies, even by SIGKILL."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """`fewstep serve` on a free loopback port, its output in a log file; always stopped by ``stop``."""

    def __init__(self, models: Path | str, log_dir: Path, name: str, **flags):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.name = name
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.cmd = [sys.executable, "-m", "fewstep.cli", "serve", "--models", str(models), "--host", HOST]
        self.cmd += ["--port", str(self.port), "--device", "cpu", "--log-level", "warning"]
        self.missing_flags = []
        for key, value in flags.items():
            flag = "--" + key.replace("_", "-")
            if flag in serve_flags():
                self.cmd += [flag, str(value)]
            else:
                self.missing_flags.append(flag)
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None  # seconds from launch to /readyz 200

    def start(self, ready_s: float = 180) -> Server:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent if LINUX else None
        )
        started = time.monotonic()
        deadline = started + ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - started
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} server was not ready within {ready_s:.0f} s: {self.log_tail()}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, wait_s: float = 40) -> int | None:
        """SIGTERM, then SIGKILL after ``wait_s``; -> the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 400) -> str:
        return " ".join(self.log_text()[-chars:].split())

    def log_errors(self, since: int = 0) -> int:
        """ERROR lines (unhandled exceptions and the like) the server logged after character ``since`` of its log."""
        return len(re.findall(r"(?m)^.*\bERROR\b", self.log_text()[since:]))

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux; 0 elsewhere)."""
        try:
            return _stat_cpu_seconds(Path(f"/proc/{self.proc.pid}/stat").read_text())
        except (OSError, AttributeError):
            return 0.0

    def thread_cpu(self) -> tuple[float, float, float]:
        """(event loop, device threads) CPU seconds so far, and the seconds the device threads spent runnable but
        waiting for a core (the scheduler's run-queue wait, /proc schedstat; 0 where the kernel keeps none): the
        main thread runs uvicorn's loop, the device threads carry their OS name (engine.name_os_thread). Linux;
        zeros elsewhere."""
        loop = device = waiting = 0.0
        try:
            tasks = list(Path(f"/proc/{self.proc.pid}/task").iterdir())
        except (OSError, AttributeError):  # no /proc, or no process
            return loop, device, waiting
        for task in tasks:
            try:
                seconds, comm = _stat_cpu_seconds((task / "stat").read_text()), (task / "comm").read_text()
            except OSError:  # a thread that ended meanwhile: the others still count
                continue
            if task.name == str(self.proc.pid):
                loop += seconds
            elif comm.startswith("fewstep-dev"):
                device += seconds
                waiting += _run_queue_seconds(task)
        return loop, device, waiting

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the report --------------------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("pass" if ok else "**FAIL**")


def cell(value: object, limit: int = 400) -> str:
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Section:
    title: str
    intro: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passed: int = 0
    failed: int = 0
    error: str | None = None
    seconds: float = 0.0

    def describe(self, intro: str, columns: list[str]) -> None:
        """``columns`` are the measured ones; an expectation and an outcome column follow them."""
        self.intro, self.columns = intro, [*columns, "expected", "outcome"]

    def row(self, *cells: object, expected: str = "", ok: bool | None = None) -> None:
        if ok is not None:
            self.passed += ok
            self.failed += not ok
        self.rows.append([cell(c) for c in cells] + [cell(expected), verdict(ok)])

    def markdown(self, number: int) -> str:
        out = [f"## {number}. {self.title}", "", self.intro, ""] if self.intro else [f"## {number}. {self.title}", ""]
        columns = self.columns or ["row", "detail", "outcome"]
        rows = list(self.rows)
        if self.error:
            rows.append([ERROR_MARK, cell(self.error, 400)] + [""] * (len(columns) - 2))
        out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out += ["", f"{self.passed} passed, {self.failed} failed ({self.seconds:.1f} s)."]
        if self.notes:
            out += [""] + self.notes
        return "\n".join(out) + "\n"


@dataclass
class Context:
    mode: Mode
    models: Path
    work: Path  # temporary: logs, the fault-injection models directory
    api_key: str = field(default_factory=lambda: "rk-" + uuid.uuid4().hex)
    servers: list[Server] = field(default_factory=list)  # every server started, for the report
    _zoo: Server | None = None

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}

    def server(self, name: str, models: Path | None = None, **flags) -> Server:
        """A new server (not started) with this run's deadlines, batch size and API key, overridable."""
        base = {"max_batch": 32, "api_key": self.api_key, **self.mode.timeouts}
        server = Server(models or self.models, self.work, name, **{**base, **flags})
        self.servers.append(server)
        return server

    def zoo(self, sec: Section) -> Server:
        """The shared server over --models for the hostile, metrics, overload and slow-client sections; started
        again (and the section told, as a failure) if an earlier section left it dead."""
        if self._zoo is not None and not self._zoo.alive:
            sec.failed += 1
            sec.notes.append(f"**FAIL**: the shared server had exited ({self._zoo.stop()}); it was started again.")
            self._zoo = None
        if self._zoo is None:
            self._zoo = self.server("zoo").start()
        return self._zoo

    def close(self) -> None:
        """Stop every server this run started that is still running (sections stop their own; this is the net)."""
        for server in self.servers:
            server.stop(wait_s=10)

    def client(self, server: Server, auth: bool = True, timeout: float = 30) -> httpx.Client:
        """One keep-alive connection (max_connections=1), no retries: a reset shows as an error."""
        transport = httpx.HTTPTransport(socket_options=NODELAY, limits=httpx.Limits(max_connections=1), retries=0)
        headers = self.auth if auth else {}
        return httpx.Client(base_url=server.url, timeout=timeout, headers=headers, transport=transport)


# ---- raw HTTP over sockets (for what httpx will not send, and for half-sent requests) ----------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


def raw_socket(port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_until(sock: socket.socket, buf: bytes, done: Callable[[bytes], bool]) -> tuple[bytes, bool]:
    """-> (bytes so far, whether the peer closed)."""
    while not done(buf):
        chunk = sock.recv(65536)
        if not chunk:
            return buf, True
        buf += chunk
    return buf, False


def read_response(sock: socket.socket) -> RawResponse | None:
    """One response; None when the server closed the connection before sending a byte. OSError on a reset."""
    buf, closed = _recv_until(sock, b"", lambda b: b"\r\n\r\n" in b)
    if closed and not buf:
        return None
    if b"\r\n\r\n" not in buf:
        raise ConnectionError("closed in the middle of response headers")
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        rest, _ = _recv_until(sock, rest, lambda b: len(b) >= n)
        body = rest[:n]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        rest, _ = _recv_until(sock, rest, lambda b: b.endswith(b"0\r\n\r\n"))
        body = _dechunk(rest)
    else:
        body, _ = _recv_until(sock, rest, lambda b: False)
    return RawResponse(int(lines[0].split()[1]), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def socket_state(sock: socket.socket) -> str:
    """'open', 'closed' or 'answered NNN' (a response arrived), without blocking."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return "open"
    except OSError:
        return "closed"
    finally:
        sock.setblocking(True)
    if not data:
        return "closed"
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return f"answered {m.group(1).decode()}" if m else "answered"


# ---- 1. hostile requests -----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    body: bytes | None = None  # the request body, as sent
    method: str = "POST"
    path: str = "/v1/generate"
    headers: dict[str, str] = field(default_factory=dict)
    expect: tuple[int, ...] = (400,)  # acceptable statuses
    auth: bool = True  # send the run's API key
    raw: list[bytes] | None = None  # sent as is over a socket, part by part (what httpx would refuse or normalise)
    close: bool = False  # the server must close the connection after answering (it could not read the request)


def js(obj: object) -> bytes:
    return json.dumps(obj).encode()


def gen(fragment: str, expect: tuple[int, ...] = (400,), name: str | None = None) -> Case:
    """A generate request whose body is the prompt and ``fragment`` (raw JSON text)."""
    return Case(name or fragment, ('{"prompt": "' + PROMPT + '", ' + fragment + "}").encode(), expect=expect)


def raw(name: str, head: str, body: bytes = b"", expect=(400,), close=False, split: int | None = None) -> Case:
    """A raw request: ``head`` up to and without the blank line; ``split`` sends it in two parts, 0.1 s apart."""
    data = (head + "\r\n\r\n").encode("latin-1") + body
    parts = [data] if split is None else [data[:split], data[split:]]
    return Case(name + " (raw)", raw=parts, expect=expect, close=close)


def hostile_cases(key: str) -> list[Case]:
    deep_arrays = "[" * 10_000 + "]" * 10_000
    ok = js(ONE_STEP)
    post = (
        f"POST /v1/generate HTTP/1.1\r\nhost: {HOST}\r\nauthorization: Bearer {key}\r\ncontent-type: application/json"
    )
    sized = f"{post}\r\ncontent-length: {len(ok)}"
    openai = "/v1/images/generations"
    return [
        # parser depth and number size (RecursionError, the int conversion limit)
        Case("10,000 nested arrays as the body", deep_arrays.encode()),
        gen('"steps": ' + deep_arrays, name="10,000 nested arrays in steps"),
        Case("10,000 nested objects (60 KB)", ('{"a":' * 10_000 + "1" + "}" * 10_000).encode()),
        gen('"seed": ' + "1" * 5000, name="seed of 5,000 digits"),
        gen('"steps": ' + "9" * 4301, name="steps of 4,301 digits"),
        gen('"n": ' + "7" * 5000, name="n of 5,000 digits"),
        gen('"guidance": 1e99999'),
        # lax types: each must be refused, not coerced
        *[gen(f) for f in ('"steps": true', '"steps": "4"', '"steps": 4.0', '"seed": "12"', '"n": "2"')],
        *[gen(f) for f in ('"prompt2": 7', '"quality": "TEACHER"', '"guidance": "1"', '"model": 7')],
        Case('"prompt": 7', b'{"prompt": 7}'),
        Case('"prompt": ["a", "b"]', b'{"prompt": ["a", "b"]}'),
        # out of range, non-standard literals, ambiguity
        *[gen(f'"n": {v}') for v in ("0", "-1", "1.5", "65", "1e3")],
        *[gen(f'"steps": {v}') for v in ("0", "-1", "101", "-99999999999")],
        *[gen(f'"seed": {v}') for v in ("-1", str(2**53), "NaN")],
        gen(f'"seed": {2**53 - 1}, "n": 2'),
        *[gen(f'"guidance": {v}') for v in ("1e308", "NaN", "Infinity", "-Infinity")],
        gen('"steps": 1, "steps": 2', name="duplicate key: steps 1, then steps 2"),
        # not a JSON object, not UTF-8
        Case("empty body", b""),
        *[Case(f"JSON {v}", v.encode()) for v in ("null", "[]", '"a string"', "42", "true")],
        Case("truncated JSON", ok[:-3]),
        Case("invalid UTF-8 in the prompt", b'{"prompt": "a red \xff\xfe 7"}'),
        Case("UTF-8 BOM before the JSON", b"\xef\xbb\xbf" + ok, expect=(200, 400)),
        Case("lone surrogate \\ud800 in the prompt", b'{"prompt": "a \\ud800 7"}', expect=(200, 400)),
        Case("NUL in the prompt", b'{"prompt": "a \\u0000 7"}', expect=(200, 400)),
        # sizes and echoes
        Case("prompt of 10,000 characters", js({"prompt": "7" * 10_000})),
        Case("body of 64 KiB + 1 byte", js({"prompt": "7" * (65_536 - 13)}), expect=(413,)),
        Case("unknown field with a 3,000-character name", js({"prompt": PROMPT, "x" * 3000: 1})),
        Case("model name of 10,000 characters", js({"prompt": PROMPT, "model": "m" * 10_000})),
        Case("unknown model", js({"prompt": PROMPT, "model": "no-such-model"}), expect=(404,)),
        Case("unknown model, OpenAI route", js({"prompt": PROMPT, "model": "no-such"}), path=openai, expect=(404,)),
        Case("size of 3,000 characters, OpenAI route", js({"prompt": PROMPT, "size": "9" * 3000}), path=openai),
        Case('response_format "url", OpenAI route', js({"prompt": PROMPT, "response_format": "url"}), path=openai),
        Case('output_format "gif"', js({"prompt": PROMPT, "output_format": "gif"})),
        Case("x-request-id of 10,000 characters", ok, headers={"x-request-id": "r" * 10_000}, expect=(200,)),
        # path traversal in model names
        *[
            Case(f"model {m!r}", js({"prompt": PROMPT, "model": m}), expect=(400, 404))
            for m in ("../digits-teacher", "digits-teacher/../../etc", "/etc/passwd", "..", "%2e%2e%2fzoo")
        ],
        *[Case(f"model {m!r}", js({"prompt": PROMPT, "model": m})) for m in ("digits-teacher\x00", "a\\..\\b")],
        # content types and encodings
        Case("content-type text/plain", ok, headers={"content-type": "text/plain"}, expect=(415,)),
        Case("content-type multipart", ok, headers={"content-type": "multipart/form-data; boundary=x"}, expect=(415,)),
        Case("content-type of 5,000 characters", ok, headers={"content-type": "text/" + "x" * 5000}, expect=(415,)),
        Case("content-encoding gzip", gzip.compress(ok), headers={"content-encoding": "gzip"}, expect=(400, 415)),
        # methods and paths
        *[Case(f"{m} /v1/generate", None, method=m, expect=(405,)) for m in ("GET", "DELETE", "OPTIONS", "HEAD")],
        *[Case(f"{m} /v1/generate", ok, method=m, expect=(405,)) for m in ("PUT", "PATCH")],
        Case("TRACE /", None, method="TRACE", path="/", expect=(405,)),
        Case("POST /healthz", b"{}", path="/healthz", expect=(405,)),
        raw("method FOO", sized.replace("POST", "FOO", 1), ok, expect=(400, 405, 501)),
        raw(
            "GET /v1/models/../../etc/passwd",
            f"GET /v1/models/../../etc/passwd HTTP/1.1\r\nhost: {HOST}\r\nauthorization: Bearer {key}",
            expect=(404,),
        ),
        Case(
            "/static/%2e%2e/%2e%2e/pyproject.toml",
            None,
            method="GET",
            path="/static/%2e%2e/%2e%2e/pyproject.toml",
            expect=(404,),
        ),
        Case("path of 8,000 characters", None, method="GET", path="/v1/" + "a" * 8000, expect=(404, 414)),
        # authentication (the server runs with --api-key)
        Case("no Authorization header", ok, auth=False, expect=(401,)),
        Case("wrong key", ok, auth=False, headers={"authorization": "Bearer wrong"}, expect=(401,)),
        Case("the key as Basic credentials", ok, auth=False, headers={"authorization": f"Basic {key}"}, expect=(401,)),
        Case("the key in the query string", ok, auth=False, path=f"/v1/generate?api_key={key}", expect=(401,)),
        raw("Authorization: 'Bearer ' (empty key)", sized.replace(f"Bearer {key}", "Bearer "), ok, expect=(401,)),
        raw("the key plus one character", sized.replace(key, key + "x"), ok, expect=(401,)),
        raw("the key less its last character", sized.replace(key, key[:-1]), ok, expect=(401,)),
        raw("the key and a second, wrong Authorization", f"{sized}\r\nauthorization: Bearer x", ok, expect=(400, 401)),
        *[
            Case(f"no key, path {p}", ok, auth=False, path=p, expect=(401, 404))
            for p in ("//v1/generate", "/v1/generate/", "/V1/generate", "/v1%2Fgenerate")
        ],
        raw(
            "no key, path /./v1/generate",
            sized.replace(f"\r\nauthorization: Bearer {key}", "").replace("/v1/", "/./v1/", 1),
            ok,
            expect=(401, 404),
        ),
        # HTTP framing
        raw(
            "one header of 60 KB, sent in two parts",
            f"GET /healthz HTTP/1.1\r\nhost: {HOST}\r\nx-big: {'b' * 60_000}",
            expect=(400, 431),
            split=20_000,
        ),
        raw(
            "5,000 headers, sent in two parts",
            f"GET /healthz HTTP/1.1\r\nhost: {HOST}" + "".join(f"\r\nx-h{i}: {i}" for i in range(5000)),
            expect=(400, 431),
            split=20_000,
        ),
        raw("request line of 20 KB", f"GET /{'a' * 20_000} HTTP/1.1\r\nhost: {HOST}", expect=(400, 404, 414)),
        raw(
            "Content-Length and Transfer-Encoding both",
            f"{post}\r\ncontent-length: 5\r\ntransfer-encoding: chunked",
            f"{len(ok):x}\r\n".encode() + ok + b"\r\n0\r\n\r\n",
            expect=(200, 400),
            close=True,
        ),
        raw("Content-Length: -1", f"{post}\r\ncontent-length: -1", expect=(400, 413)),
        raw("Content-Length: abc", f"{post}\r\ncontent-length: abc", expect=(400, 413)),
        raw(
            "Content-Length: 10 GB with Expect: 100-continue",
            f"{post}\r\ncontent-length: 10000000000\r\nexpect: 100-continue",
            expect=(413,),
            close=True,
        ),
        raw(
            "chunked body of 70 KB",
            f"{post}\r\ntransfer-encoding: chunked",
            b"".join(b"3e8\r\n" + b"7" * 1000 + b"\r\n" for _ in range(70)) + b"0\r\n\r\n",
            expect=(413,),
        ),
        raw("header name with a space", f"GET /healthz HTTP/1.1\r\nhost: {HOST}\r\nbad header: x"),
        raw("content-type with byte 0xff", sized.replace("json", "json\xff"), ok, expect=(200, 400, 415)),
        raw("HTTP/1.1 without Host", "GET /healthz HTTP/1.1", expect=(200, 400)),
        raw("HTTP/0.9 request line", "GET /"),
        Case("TLS ClientHello on the plain port (raw)", raw=[bytes.fromhex("16030100a5010000a10303") + b"\0" * 64]),
    ]


def _error_fields(body: bytes) -> tuple[str, int]:
    """-> (error code, length of the longest echoed field) from an error body ('-' when not the JSON shape)."""
    try:
        err = json.loads(body)["error"]
        return str(err.get("code")), max(len(str(err.get("message") or "")), len(str(err.get("param") or "")))
    except (ValueError, KeyError, TypeError):
        return "-", len(body)  # a plain-text error body is all message


def run_http_case(ctx: Context, server: Server, case: Case) -> tuple[int | None, str, int, int, str]:
    """-> (status, error code, response bytes, echo chars, next request) over one httpx keep-alive connection."""
    headers = {"content-type": "application/json"} if case.body is not None else {}
    headers.update(case.headers)
    with ctx.client(server, auth=case.auth) as c:
        r = c.request(case.method, case.path, content=case.body, headers=headers)
        code, echo = _error_fields(r.content) if r.status_code >= 400 else ("-", 0)
        echo = max(echo, len(r.headers.get("x-request-id", "")))
        try:
            after = c.post("/v1/generate", json={**ONE_STEP, "seed": 1}, headers=ctx.auth)
            nxt = str(after.status_code)
        except httpx.HTTPError as e:
            nxt = f"error: {type(e).__name__}"
    return r.status_code, code, len(r.content), echo, nxt


def run_raw_case(ctx: Context, server: Server, case: Case) -> tuple[int | None, str, int, int, str]:
    """The same over a socket; when the server says Connection: close, a clean close is the right next step."""
    with raw_socket(server.port, timeout=ctx.mode.body_s + 3) as sock:
        try:
            for i, part in enumerate(case.raw):
                if i:
                    time.sleep(0.1)
                sock.sendall(part)
            resp = read_response(sock)
        except OSError as e:
            return None, "-", 0, 0, f"error: {type(e).__name__}"
        if resp is None:
            return None, "-", 0, 0, "closed without a response"
        code, echo = _error_fields(resp.body) if resp.status >= 400 else ("-", 0)
        sock.settimeout(3)
        try:
            if resp.closes:
                nxt = "closed (Connection: close)" if sock.recv(1) == b"" else "bytes after Connection: close"
            else:
                headers = {**ctx.auth, "content-type": "application/json"}
                sock.sendall(raw_request(server.port, "POST", "/v1/generate", headers, js({**ONE_STEP, "seed": 1})))
                after = read_response(sock)
                nxt = str(after.status) if after else "closed without Connection: close"
        except TimeoutError:
            nxt = "left open after Connection: close" if resp.closes else "no answer (timeout)"
        except OSError as e:
            nxt = f"error: {type(e).__name__}"
    return resp.status, code, len(resp.body), echo, nxt


def hostile_requests(ctx: Context, sec: Section) -> None:
    sec.describe(
        "Each request goes over its own keep-alive connection, then a valid 1-step request follows on that same "
        "connection (`next`). Expected: the listed status (a 4xx for every malformed request, never a 5xx), the "
        f"connection still usable (or closed after `Connection: close`), and no echoed field (message, param, "
        f"x-request-id) over {MAX_ECHO} characters. Cases marked raw are sent over a socket as written.",
        ["case", "status", "error code", "bytes", "next", "echo chars"],
    )
    server = ctx.zoo(sec)
    log_start = len(server.log_text())
    for case in hostile_cases(ctx.api_key):
        try:
            runner = run_raw_case if case.raw is not None else run_http_case
            status, code, size, echo, nxt = runner(ctx, server, case)
        except (httpx.HTTPError, OSError) as e:
            status, code, size, echo, nxt = None, "-", 0, 0, f"error: {type(e).__name__}: {e}"
        closed = nxt == "closed (Connection: close)"
        ok = status in case.expect and (closed if case.close else nxt == "200" or closed) and echo <= MAX_ECHO
        expected = "/".join(map(str, case.expect)) + (", then closed" if case.close else ", next ok")
        sec.row(case.name, status or "none", code, size, nxt, echo, expected=expected + f", echo ≤ {MAX_ECHO}", ok=ok)
    errors = server.log_errors(log_start)
    sec.row("server log during this section", f"{errors} ERROR lines", "", "", "", "", expected="0", ok=errors == 0)
    sec.notes.append(
        "Why some expectations: a duplicate key is refused because two parsers (a proxy's and the server's) may "
        "take different values from it; after a request with both Content-Length and Transfer-Encoding the server "
        "must close the connection (RFC 9112 §6.1), and so after a request whose body it did not read (the 413 to "
        "`Expect: 100-continue`), saying so with `Connection: close`. Trailing spaces after the key are not tried: "
        "HTTP strips them before the server sees the header."
    )


# ---- 2. metrics cardinality --------------------------------------------------------------------------------


def metric_series(text: str) -> tuple[int, set[str]]:
    """-> (fewstep_ sample lines, label sets: family + labels without `le`)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("fewstep_")]
    sets = set()
    for ln in lines:
        name, _, rest = ln.partition("{")
        family = re.sub(r"_(bucket|sum|count|created|total)$", "", name.split(" ")[0])
        labels = re.sub(r'(^|,)le="[^"]*"', "", rest.rpartition("}")[0]) if rest else ""
        sets.add(family + "{" + labels.strip(",") + "}")
    return len(lines), sets


LABEL_GROUPS = (
    "random model names",
    "random bad step counts",
    "random models, OpenAI route",
    "random paths",
    "random API keys",
)


def label_probe(group: str, rng: random.Random) -> tuple[str, str, dict | None, dict[str, str]]:
    """One request of ``group`` with a fresh random value: (method, path, JSON body, headers)."""
    tag = f"m-{rng.getrandbits(48):x}"
    if group == "random model names":
        return "POST", "/v1/generate", {"prompt": PROMPT, "model": tag}, {}
    if group == "random bad step counts":
        return "POST", "/v1/generate", {"prompt": PROMPT, "steps": rng.randint(101, 10**9)}, {}
    if group == "random models, OpenAI route":
        return "POST", "/v1/images/generations", {"prompt": PROMPT, "model": tag}, {}
    if group == "random paths":
        return "GET", f"/v1/{tag}", None, {}
    return "POST", "/v1/generate", ONE_STEP, {"authorization": f"Bearer {tag}"}


def metrics_cardinality(ctx: Context, sec: Section) -> None:
    n = ctx.mode.metrics_requests
    sec.describe(
        f"/metrics before and after {n} requests in each group, each request with a fresh random value. A label "
        "set is one metric family with one combination of label values (all of a histogram's buckets count once). "
        "Expected: at most 5 new label sets per group, whatever the number of distinct values sent.",
        ["group", "statuses", "/metrics bytes", "fewstep_ lines", "new label sets"],
    )
    server = ctx.zoo(sec)
    rng = random.Random(6)
    with ctx.client(server) as c:
        for group in LABEL_GROUPS:
            before = c.get("/metrics").text
            statuses: Counter[int] = Counter()
            deadline = time.monotonic() + 60
            for _ in range(n):
                if time.monotonic() > deadline:
                    break
                method, path, body, headers = label_probe(group, rng)
                statuses[c.request(method, path, json=body, headers=headers).status_code] += 1
            after = c.get("/metrics").text
            (lines0, sets0), (lines1, sets1) = metric_series(before), metric_series(after)
            added = len(sets1 - sets0)
            sec.row(
                group,
                ", ".join(f"{k}×{v}" for k, v in sorted(statuses.items())),
                f"{len(before):,} → {len(after):,}",
                f"{lines0} → {lines1}",
                added,
                expected="≤ 5 new label sets",
                ok=added <= 5,
            )


# ---- 3. overload -------------------------------------------------------------------------------------------


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


async def closed_loop(port: int, headers: dict[str, str], clients: int, seconds: float) -> tuple[float, Counter]:
    """``clients`` workers each sending 1-step requests back to back for ``seconds``: -> (200s per second, statuses)."""
    pool, statuses = RawPool(port, ONE_STEP, headers), Counter()
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            try:
                status, _ = await asyncio.wait_for(pool.post(), 60)
                statuses[status] += 1
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                statuses[type(e).__name__] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    pool.close()
    return statuses[200] / elapsed, statuses


@dataclass
class LoadResult:
    offered: int = 0
    statuses: Counter = field(default_factory=Counter)
    retry_after: int = 0  # 429s that carried Retry-After
    not_sent: int = 0  # arrivals skipped because the generator's in-flight cap was reached
    latencies_ms: list[float] = field(default_factory=list)  # of the 200s
    elapsed: float = 0.0


async def open_loop(
    port: int, headers: dict[str, str], rate: float, seconds: float, cap: int, patience: float
) -> LoadResult:
    """Arrivals every 1/rate s for ``seconds`` whatever the server does (open loop), at most ``cap`` in flight
    (benchmarks/loadgen.py's OpenLoop: callbacks, no task per request, so that it leaves the cores to the server)."""
    gen, res = OpenLoop(port, ONE_STEP, headers), LoadResult()

    def answered(status: int, h: dict[str, str], seconds: float) -> None:
        res.statuses[status] += 1
        if status == 200:
            res.latencies_ms.append(1000 * seconds)
        elif status == 429 and "retry-after" in h:
            res.retry_after += 1

    def failed(error: str) -> None:
        res.statuses[error] += 1

    gen.on_answer, gen.on_failure = answered, failed
    res.offered, res.not_sent, res.elapsed = await gen.run(rate, seconds, cap, patience)
    return res


def overload(ctx: Context, sec: Section) -> None:
    m = ctx.mode
    sec.describe(
        f"Capacity: 32 clients sending 1-step requests back to back for {m.capacity_s:.0f} s (max_batch 32, the "
        f"default queue of 64), measured before and after each overload window. Then open-loop arrivals at 2x and "
        f"4x the capacity just measured for {m.load_s:.0f} s each, at most {m.inflight_cap} in flight, each waiting "
        f"at most {m.patience_s:.0f} s for its answer. Goodput = 200s per second from the first arrival to the last "
        "answer, as a share of the mean of the capacities measured just before and just after its window (a "
        "shared VM's speed drifts by tens of percent within a minute; bracketing the window takes the drift out "
        "of the ratio). CPU = seconds used by the server process (with the share of a core its event-loop thread "
        "and its device threads (with their OpenMP workers) took on average, and the share of a core the device "
        "threads spent runnable but waiting for a core, from the scheduler's /proc schedstat: in the throughput "
        "mode, whose batches are single-threaded, a batch's time that is neither is time blocked, on the GIL "
        "while another thread holds it) / by the load generator (a small asyncio "
        "HTTP client, so that the generator leaves the cores to the server). Batches = the window's mean model "
        "time and images per batch, and how many ran at once on average (device time / wall time; about 2 in the CPU "
        "throughput mode, docs/api.md \"Engine\"), from /metrics. Expected: goodput ≥ 85% of capacity; only 200 and "
        "429 (each 429 with Retry-After).",
        ["load", "offered", "goodput (img/s)", "% of capacity", "outcomes", "p50 / p99 ms of 200s", "CPU s",
         "batches: ms × images, at once"],
    )  # fmt: skip
    server = ctx.zoo(sec)
    asyncio.run(closed_loop(server.port, ctx.auth, 32, 1.0))  # warm up: connections, allocator, batch shapes

    def measure_capacity() -> tuple[float, Counter, str, str]:
        """-> (images/s, statuses, CPU, batches): its row is added by the caller, after the window it closes."""
        cpu = _cpu_now(server)
        batches, t0 = batch_totals(server.url, ctx.auth), time.perf_counter()
        capacity, statuses = asyncio.run(closed_loop(server.port, ctx.auth, 32, m.capacity_s))
        batch_text = batches_since(server.url, ctx.auth, batches, time.perf_counter() - t0)
        return capacity, statuses, _cpu(server, cpu), batch_text

    def capacity_row(label: str, capacity: float, statuses: Counter, cpu_text: str, batches: str) -> None:
        sec.row(label, "-", f"{capacity:.1f}", "-", _outcomes(statuses), "-", cpu_text, batches,
                expected="200s only", ok=set(statuses) == {200})  # fmt: skip

    before, *measured = measure_capacity()
    capacity_row("capacity (32 clients)", before, *measured)
    for factor in (2, 4):
        cpu, batches = _cpu_now(server), batch_totals(server.url, ctx.auth)
        res = asyncio.run(open_loop(server.port, ctx.auth, factor * before, m.load_s, m.inflight_cap, m.patience_s))
        cpu_text, batch_text = _cpu(server, cpu), batches_since(server.url, ctx.auth, batches, res.elapsed)
        after, *after_measured = measure_capacity()
        capacity = (before + after) / 2
        goodput = res.statuses[200] / res.elapsed
        other = sum(v for k, v in res.statuses.items() if k not in (200, 429))
        outcomes = _outcomes(res.statuses) + f"; 429 with Retry-After: {res.retry_after}"
        if res.not_sent:
            outcomes += f"; not sent (generator cap): {res.not_sent}"
        latency = f"{percentile(res.latencies_ms, 50):.0f} / {percentile(res.latencies_ms, 99):.0f}"
        sec.row(
            f"{factor}x capacity ({factor * before:.0f}/s)",
            res.offered,
            f"{goodput:.1f}",
            f"{100 * goodput / capacity:.0f}% of {capacity:.1f}",
            outcomes,
            latency,
            cpu_text,
            batch_text,
            expected="≥ 85%; only 200/429",
            ok=goodput >= 0.85 * capacity and other == 0 and res.retry_after == res.statuses[429],
        )
        capacity_row(f"capacity after {factor}x", after, *after_measured)
        before = after
    sec.notes.append(
        "The load generator sends each request whole in one write, so its refusals are answered at the wire, "
        "before h11 (server/rejection.py; `python benchmarks/refusal.py` times both paths). The generator and "
        "the server share the machine's cores: its CPU seconds are in the last column."
    )


def batch_totals(url: str, headers: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(model seconds, batches, images) of every batch so far, from the /metrics of the server at ``url``."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    totals = []
    for name in ("fewstep_batch_inference_seconds_sum", "fewstep_batch_inference_seconds_count",
                 "fewstep_batch_size_images_sum"):  # fmt: skip
        totals.append(sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)))
    return totals[0], totals[1], totals[2]


def batches_since(url: str, headers: dict[str, str] | None, since: tuple[float, float, float], seconds: float) -> str:
    """The batches since ``since`` (batch_totals then) over ``seconds``: mean model ms × images per batch, and how
    many batches ran at once on average (model seconds per second)."""
    model_s, count, images = (now - then for now, then in zip(batch_totals(url, headers), since, strict=True))
    if not count:
        return "none"
    return f"{1000 * model_s / count:.0f} ms × {images / count:.1f}, {model_s / seconds:.2f}"


def _stat_cpu_seconds(stat: str) -> float:
    """User + system CPU seconds from a /proc/<pid>/stat (or /proc/<pid>/task/<tid>/stat) line."""
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_queue_seconds(task: Path) -> float:
    """Seconds a thread has spent runnable, waiting for a core: the second field of its schedstat (ns)."""
    try:
        return int((task / "schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):  # a kernel without schedstats, or the thread ended
        return 0.0


def _cpu_now(server: Server) -> tuple[float, ...]:
    return (server.cpu_seconds(), *server.thread_cpu(), time.process_time(), time.perf_counter())


def _cpu(server: Server, since: tuple[float, ...]) -> str:
    """Server CPU s (the loop's and the device threads' share of a core on average, and the device threads' share
    of a core spent waiting for one) / the load generator's CPU s."""
    total, loop, device, waiting, generator, wall = (
        now - then for now, then in zip(_cpu_now(server), since, strict=True)
    )
    return (
        f"{total:.1f} (loop {loop / wall:.2f}, device {device / wall:.2f} + {waiting / wall:.2f} waiting for a core)"
        f" / {generator:.1f}"
    )


def _outcomes(statuses: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0])))


# ---- 4. fault injection ------------------------------------------------------------------------------------


def build_fault_models(zoo: Path, root: Path) -> tuple[str, str, dict[str, str]]:
    """Under ``root``: the zoo's teacher and a healthy student (digits-reflow-2rf when there), and broken copies of
    the student. -> (teacher, healthy student, {broken student: how it is broken})."""
    from fewstep.models.pipeline import TextToImage

    root.mkdir(parents=True)
    models = sorted(p for p in zoo.iterdir() if p.is_dir())
    students = [p for p in models if _card(p).get("role") == "student"]
    student = next((p for p in students if p.name == "digits-reflow-2rf"), students[0])
    named = (_card(student).get("teacher") or {}).get("name")  # its own teacher, when the zoo holds several
    teacher = next((p for p in models if p.name == named), None) or next(
        p for p in models if _card(p).get("role") == "teacher"
    )
    shutil.copytree(teacher, root / teacher.name)
    shutil.copytree(student, root / student.name)
    broken = {
        "broken-truncated": "transformer weights cut to half their size",
        "broken-corrupt": "transformer weights of the right size with 4 KiB of flipped bytes",
        "broken-card": "card.json is not valid JSON",
        "broken-nan": "loads; the final layer's bias is NaN, so every output is NaN (fails warm-up)",
        "broken-flaky": "loads and passes warm-up; NaN for prompts that mention 7 (fails at run time)",
    }
    for name in ("broken-truncated", "broken-corrupt", "broken-card"):
        shutil.copytree(student, root / name)
        card = _card(root / name)
        (root / name / "card.json").write_text(json.dumps({**card, "name": name}))
    weights = root / "broken-truncated" / "transformer.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    weights = root / "broken-corrupt" / "transformer.safetensors"
    data = bytearray(weights.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = bytes(b ^ 0xFF for b in data[mid : mid + 4096])
    weights.write_bytes(bytes(data))
    (root / "broken-card" / "card.json").write_text('{"name": "broken-card", "role": "stud')

    import torch

    for name in ("broken-nan", "broken-flaky"):  # as tests/serving.py builds its NaN student
        model = TextToImage.load(student, kernels="torch")
        with torch.no_grad():
            if name == "broken-nan":
                model.transformer.final_layer.linear.bias.fill_(float("nan"))
            else:
                for word in ("7", "seven"):
                    model.text_encoder.embed.weight[model.tokenizer.index[word]] = float("nan")
        card = model.card.model_dump(exclude={"files", "model"})
        model.save(root / name, {**card, "name": name}, dtype="float32")
    return teacher.name, student.name, broken


def _card(path: Path) -> dict:
    try:
        return json.loads((path / "card.json").read_text())
    except (OSError, ValueError):
        return {}


def fault_injection(ctx: Context, sec: Section) -> None:
    root = ctx.work / "fault-models"
    teacher, healthy, broken = build_fault_models(ctx.models, root)
    sec.describe(
        f"A models directory with the zoo's teacher, {healthy} and broken copies of it: "
        + "; ".join(f"`{k}`: {v}" for k, v in broken.items())
        + f". Server A serves them all, its default model {healthy}; server B serves them all but "
        "broken-flaky, its default model broken-nan (`--default-model`). "
        "Expected: every request answered 200, by the teacher when it names a broken student (with a "
        "fallback_reason) and by the healthy student when it names no model; /readyz 200 and `degraded`, naming "
        "each student known to be broken (broken-flaky once its circuit has opened).",
        ["server", "request", "status", "served_by", "steps", "fallback_reason"],
    )
    named = [(f"model {name}", {**ONE_STEP, "model": name}, teacher) for name in broken]
    named += [("model broken-flaky, again", {**ONE_STEP, "model": "broken-flaky"}, teacher)] * 3  # opens its circuit
    unnamed = [(f"no model, steps {s}", {"prompt": PROMPT, "steps": s}, healthy) for s in (1, 2, 4)]
    unnamed += [("no model, no steps", {"prompt": PROMPT}, healthy)]
    with ctx.server("fault-a", root, default_model=healthy) as a:
        _ask(ctx, sec, a, "A", named + unnamed)
        _ask_openai(ctx, sec, a, "A", teacher)
        _readyz(ctx, sec, a, "A", list(broken), root)
    root_b = ctx.work / "fault-models-b"  # without broken-flaky, a fair pick for unnamed requests until it fails
    root_b.mkdir()
    for model in root.iterdir():
        if model.name != "broken-flaky":
            (root_b / model.name).symlink_to(model, target_is_directory=True)
    with ctx.server("fault-b", root_b, default_model="broken-nan") as b:
        _ask(ctx, sec, b, "B", unnamed)
        _readyz(ctx, sec, b, "B", [n for n in broken if n != "broken-flaky"], root_b)


def _json(r: httpx.Response) -> dict:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _ask(ctx: Context, sec: Section, server: Server, label: str, requests: list[tuple[str, dict, str]]) -> None:
    """Each request in turn: who served it, at how many steps, and why."""
    with ctx.client(server, timeout=120) as c:
        for what, body, expect in requests:
            r = c.post("/v1/generate", json={**body, "seed": 3})
            j = _json(r)
            served = j.get("served_by") or (j.get("error") or {}).get("message", "-")
            reason = j.get("fallback_reason")
            needs_reason = "model" in body
            ok = r.status_code == 200 and served == expect and (bool(reason) or not needs_reason)
            expected = f"200 by {expect}" + (", with a reason" if needs_reason else "")
            sec.row(label, what, r.status_code, served, j.get("steps", "-"), reason or "-", expected=expected, ok=ok)
            if reason and j.get("steps") == body.get("steps") and body.get("steps", 0) < 5:
                sec.notes.append(
                    f"Server {label}, `{what}`: the fallback ran {served} at the student's {j['steps']} step(s), "
                    "not at its default steps (the student's card could not tell the server which counts it serves)."
                )


def _ask_openai(ctx: Context, sec: Section, server: Server, label: str, teacher: str) -> None:
    with ctx.client(server, timeout=120) as c:
        r = c.post("/v1/images/generations", json={"prompt": PROMPT, "model": "broken-nan", "quality": "low"})
    served = r.headers.get("x-served-by") or (_json(r).get("error") or {}).get("message", "-")
    sec.row(label, "OpenAI route: model broken-nan, quality low", r.status_code, served, r.headers.get("x-steps", "-"),
            r.headers.get("x-fallback-reason") or "-", expected=f"200 by {teacher}",
            ok=r.status_code == 200 and served == teacher)  # fmt: skip


def _readyz(ctx: Context, sec: Section, server: Server, label: str, broken: list[str], root: Path) -> None:
    with ctx.client(server) as c:
        r = c.get("/readyz")
    text = r.text.replace(str(root) + "/", "")
    missing = [name for name in broken if name not in text]
    state, _, causes = text.partition(": ")
    text = state + (": " + "; ".join(c if len(c) < 90 else c[:89] + "…" for c in causes.split("; ")) if causes else "")
    sec.row(label, "GET /readyz", r.status_code, text, "", "", expected="200 `degraded: ...` naming each broken one",
            ok=r.status_code == 200 and text.startswith("degraded") and not missing)  # fmt: skip
    errors = server.log_errors()
    sec.row(label, "server log", f"{errors} ERROR lines", "", "", "", expected="0", ok=errors == 0)


# ---- 5. drain ----------------------------------------------------------------------------------------------


@dataclass
class DrainLog:
    """What clients saw, stamped with seconds since SIGTERM (negative: before it)."""

    t0: float = float("inf")  # when SIGTERM was sent (perf_counter)
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (t, who, outcome)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, who: str, outcome: str) -> None:
        with self.lock:
            self.events.append((time.perf_counter() - self.t0, who, outcome))

    def after(self, who: str) -> list[str]:
        return [o for t, w, o in self.events if t >= 0 and w == who]


def _client_loop(
    ctx: Context, url: str, log: DrainLog, who: str, path: str, stop: threading.Event, go: threading.Event
) -> None:
    """Requests back to back on one keep-alive connection while ``go`` is set, until the server refuses connections
    or ``stop``."""
    transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1), retries=0)
    with httpx.Client(base_url=url, timeout=20, headers=ctx.auth, transport=transport) as c:
        while not stop.is_set():
            if not go.wait(timeout=0.05):
                continue
            try:
                if path == "/readyz":
                    r = c.get(path)
                    time.sleep(0.05)
                else:
                    r = c.post(path, json={**ONE_STEP, "seed": 5})
                close = r.headers.get("connection", "").lower() == "close"
                log.add(who, f"{r.status_code}{' close' if close else ''}")
            except httpx.ConnectError:
                log.add(who, "refused")
                if log.t0 < time.perf_counter():
                    return  # the listener has closed: a client would go elsewhere
                time.sleep(0.05)
            except httpx.HTTPError as e:  # a reset or a close without a response, on a pooled connection
                log.add(who, f"reset ({type(e).__name__})")
                time.sleep(0.05)


def _stalled_sockets(port: int, key: str) -> dict[str, socket.socket]:
    upload = raw_socket(port, timeout=60)
    head = raw_request(
        port, "POST", "/v1/generate", {"authorization": f"Bearer {key}", "content-type": "application/json"}, b""
    )
    upload.sendall(head.replace(b"content-length: 0", b"content-length: 1000") + b'{"prompt": "a red')
    partial = raw_socket(port, timeout=60)
    partial.sendall(f"GET /healthz HTTP/1.1\r\nhost: {HOST}\r\nx-slow: ".encode())
    return {"stalled upload": upload, "half-sent headers": partial}


def drain_run(ctx: Context, sec: Section, stalled: bool) -> None:
    label = "with a stalled upload and half-sent headers" if stalled else "keep-alive clients only"
    log, stop, go, always, inflight = DrainLog(), threading.Event(), threading.Event(), threading.Event(), {}
    always.set()
    server = ctx.server("drain-stalled" if stalled else "drain").start()
    log_start = len(server.log_text())

    def teacher_request() -> None:  # in flight at SIGTERM: 4 images from the 40-step teacher
        with httpx.Client(base_url=server.url, timeout=60, headers=ctx.auth) as c:
            for _ in range(5):  # admitted to an empty queue; a 429 (clients' work still queued) is retried
                try:
                    r = c.post("/v1/generate", json={"prompt": PROMPT, "quality": "teacher", "n": 4, "seed": 9})
                    inflight["status"] = str(r.status_code)
                except httpx.HTTPError as e:
                    inflight["status"] = f"error: {type(e).__name__}"
                    break
                if r.status_code != 429:
                    break
                time.sleep(0.1)
        inflight["t"] = time.perf_counter()

    clients = [("client0", "/v1/generate", go), ("client1", "/v1/generate", go), ("client2", "/v1/generate", go)]
    clients.append(("readyz", "/readyz", always))
    threads = [
        threading.Thread(target=_client_loop, args=(ctx, server.url, log, who, path, stop, gate))
        for who, path, gate in clients
    ]
    teacher = threading.Thread(target=teacher_request)
    sockets: dict[str, socket.socket] = {}
    code = drain_s = None
    try:
        sockets = _stalled_sockets(server.port, ctx.api_key) if stalled else {}
        go.set()
        for t in threads:
            t.start()
        time.sleep(0.6)  # the clients' keep-alive connections are in use
        go.clear()
        time.sleep(0.4)  # the clients pause and the queue empties
        teacher.start()
        time.sleep(0.1)  # the teacher's batch is admitted and starts
        go.set()
        time.sleep(0.2)  # the clients send again, on their pooled connections
        log.t0 = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = server.proc.wait(timeout=ctx.mode.drain_budget_s + 5)
            drain_s = time.perf_counter() - log.t0
        socket_states = {name: socket_state(s) for name, s in sockets.items()}
    finally:
        stop.set()
        for t in [*threads, teacher]:
            if t.ident is not None:  # started
                t.join(timeout=25)
        for s in sockets.values():
            s.close()
        server.stop(wait_s=5)
    _drain_rows(ctx, sec, label, log, code, drain_s, inflight, socket_states, server.log_errors(log_start))


def _drain_rows(
    ctx: Context,
    sec: Section,
    label: str,
    log: DrainLog,
    code: int | None,
    drain_s: float | None,
    inflight: dict[str, str],
    socket_states: dict[str, str],
    log_errors: int,
) -> None:
    m = ctx.mode
    grace, deadline = m.timeouts["drain_grace_s"], m.drain_budget_s
    ready_503 = next((t for t, w, o in log.events if w == "readyz" and t >= 0 and o.startswith("503")), None)
    sec.row(
        label,
        "/readyz says 503 after SIGTERM",
        "never" if ready_503 is None else f"after {ready_503:.2f} s",
        expected=f"within {grace:.0f} s (the grace period)",
        ok=ready_503 is not None and ready_503 <= grace,
    )
    answers = [o for who in ("client0", "client1", "client2") for o in log.after(who)]
    counts = Counter(answers)
    sec.row(
        label,
        "client outcomes after SIGTERM",
        _outcomes(counts) or "none",
        expected="some 200 close (served in the grace period, told to close)",
        ok=any(o == "200 close" for o in answers),
    )
    resets = sum(1 for o in answers + log.after("readyz") if o.startswith("reset"))
    sec.row(label, "resets and closes without a response", resets, expected="0", ok=resets == 0)
    status, answered = inflight.get("status", "no answer"), inflight.get("t", float("inf")) - log.t0
    when = f"answered {answered:.1f} s after SIGTERM" if answered >= 0 else "answered before SIGTERM (not in flight)"
    sec.row(label, "in-flight teacher request (n=4)", f"{status}, {when}" if answered < float("inf") else status,
            expected="200, answered after SIGTERM", ok=status == "200" and 0 <= answered < float("inf"))  # fmt: skip
    sec.row(label, "exit status", "did not exit (killed)" if code is None else code, expected="0", ok=code == 0)
    sec.row(
        label,
        "drain time (SIGTERM → exit)",
        "over budget" if drain_s is None else f"{drain_s:.1f} s",
        expected=f"≤ {deadline:.0f} s (grace + drain timeout)",
        ok=drain_s is not None and drain_s <= deadline + 1,
    )
    for name, state in socket_states.items():
        sec.row(label, f"{name} socket at exit", state, expected="closed or answered", ok=state != "open")
    sec.row(label, "server log", f"{log_errors} ERROR lines", expected="0", ok=log_errors == 0)


def drain(ctx: Context, sec: Section) -> None:
    m = ctx.mode
    sec.describe(
        "Three clients send 1-step requests back to back over keep-alive connections, pause while a 4-image "
        "40-step teacher request enters the empty queue, and send again; a fourth polls /readyz every 50 ms. "
        "SIGTERM arrives 0.2 s later, with the teacher's batch in flight. Deadlines: grace "
        f"{m.timeouts['drain_grace_s']:.0f} s, drain {m.timeouts['drain_timeout_s']:.0f} s, header "
        f"{m.header_s:.0f} s, body {m.body_s:.0f} s. The full run drains twice, with and without a stalled upload "
        "and a half-sent header open; the quick run once, with them. A refused connection after the listener closed is "
        "expected; a reset (or a close without a response) on a pooled connection is not.",
        ["run", "measure", "outcome"],
    )
    runs = (True,) if m.name == "quick" else (False, True)  # quick: the clients and the stalled sockets at once
    for stalled in runs:
        drain_run(ctx, sec, stalled)


# ---- 6. slow clients ---------------------------------------------------------------------------------------


def _open_sockets(port: int, n: int, first_bytes: bytes) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = raw_socket(port)
        if first_bytes:
            s.sendall(first_bytes)
        out.append(s)
    return out


def _trickle(socks: list[socket.socket], seconds: float) -> None:
    """One header byte per socket every 0.5 s for ``seconds``: busy, but never finishing its headers."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s in socks:
            with contextlib.suppress(OSError):
                s.send(b"x")
        time.sleep(0.5)


def slow_clients(ctx: Context, sec: Section) -> None:
    m = ctx.mode
    sec.describe(
        f"Connections that never finish a request, checked {m.header_s + 1:.0f} s after they opened (the header "
        f"deadline, {m.header_s:.0f} s, + 1 s) or after their headers (the body deadline, {m.body_s:.0f} s, + 1 s). "
        "Expected: every one closed by the server (a stalled upload answered 408 first), a normal request answered "
        "meanwhile, and no ERROR logged for clients that vanish mid-upload.",
        ["connections", "count", "after the deadline"],
    )
    server = ctx.zoo(sec)
    log_start = len(server.log_text())
    partial = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: "
    upload = raw_request(server.port, "POST", "/v1/generate", {**ctx.auth, "content-type": "application/json"}, b"")
    upload = upload.replace(b"content-length: 0", b"content-length: 1000") + b'{"prompt": "a'
    groups: dict[str, list[socket.socket]] = {}
    total = 0
    try:
        groups["half-sent headers"] = _open_sockets(server.port, m.slow_sockets, partial)
        groups["idle (no bytes)"] = _open_sockets(server.port, m.few_sockets, b"")
        groups["trickling header bytes"] = _open_sockets(server.port, m.few_sockets, partial)
        groups["stalled uploads (100 of 1000 bytes)"] = _open_sockets(server.port, m.few_sockets, upload)
        t0 = time.perf_counter()
        with ctx.client(server) as c:
            r = c.post("/v1/generate", json=ONE_STEP)
            ms = 1000 * (time.perf_counter() - t0)
        total = sum(len(v) for v in groups.values())
        sec.row(
            f"a 1-step request with {total} slow connections open",
            1,
            f"{r.status_code} in {ms:.0f} ms",
            expected="200",
            ok=r.status_code == 200,
        )
        _trickle(groups["trickling header bytes"], max(m.header_s, m.body_s) + 1 - (time.perf_counter() - t0))
        for name, socks in groups.items():
            states = Counter(socket_state(s) for s in socks)
            still_open = states.get("open", 0)
            want = "all answered 408 or closed" if "upload" in name else "all closed"
            sec.row(name, len(socks), _outcomes(states), expected=want, ok=still_open == 0)
    finally:
        for socks in groups.values():
            for s in socks:
                s.close()
    time.sleep(0.5)
    errors = server.log_errors(log_start)
    sec.row("server log, these connections included", total, f"{errors} ERROR lines", expected="0", ok=errors == 0)
    _vanishing_uploads(sec, server, m.few_sockets, upload)


def _vanishing_uploads(sec: Section, server: Server, n: int, upload: bytes) -> None:
    """Clients that send part of a body and go: half close (FIN), half reset (RST)."""
    log_start = len(server.log_text())
    for i in range(n):
        s = raw_socket(server.port)
        s.sendall(upload)
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    time.sleep(1.0)
    errors = server.log_errors(log_start)
    sec.row("uploads abandoned mid-body (FIN / RST)", n, f"{errors} ERROR lines logged", expected="0", ok=errors == 0)


# ---- the run -----------------------------------------------------------------------------------------------

SECTIONS: list[tuple[str, Callable[[Context, Section], None]]] = [
    ("Hostile requests", hostile_requests),
    ("Metrics cardinality", metrics_cardinality),
    ("Overload", overload),
    ("Fault injection", fault_injection),
    ("Drain", drain),
    ("Slow clients", slow_clients),
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln
        )
    import torch

    return (
        f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), httpx {httpx.__version__}, {platform.system()} {platform.release()}"
    )


def server_code() -> str:
    """Which server code ran: the module's location, and the commit with any uncommitted changes under server/."""
    import fewstep.server

    where = Path(fewstep.server.__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=where)
        dirty = subprocess.run(["git", "status", "--porcelain", "."], capture_output=True, text=True, cwd=where)
    except OSError:
        return str(where)
    if head.returncode != 0:
        return str(where)
    changes = len(dirty.stdout.splitlines())
    return f"{where} at commit {head.stdout.strip()}" + (f" + {changes} uncommitted changes there" if changes else "")


def render(sections: list[Section], ctx: Context, argv: list[str], seconds: float, load: str) -> str:
    passed, failed = sum(s.passed for s in sections), sum(s.failed for s in sections)
    errors = [s.title for s in sections if s.error]
    missing = sorted({f for server in ctx.servers for f in server.missing_flags})
    startups = ", ".join(f"{v.name} {v.startup_s:.1f} s" for v in ctx.servers if v.startup_s is not None)
    head = [
        "# Reliability",
        "",
        f"Measured by `{shlex.join(['python', 'benchmarks/reliability.py', *argv])}` ({ctx.mode.name} mode, "
        f"{seconds:.0f} s) on {time.strftime('%Y-%m-%d')}.",
        "",
        f"- Machine: {machine()}; load average {load} at the start. The servers and their clients share it.",
        f"- Server code: {server_code()}.",
        "- Servers: `python -m fewstep.cli serve --device cpu --host 127.0.0.1 --log-level warning --max-batch 32 "
        "--api-key KEY` plus "
        + ", ".join(f"`--{k.replace('_', '-')} {v:g}`" for k, v in ctx.mode.timeouts.items())
        + " (when the server has them), each on a free loopback port; start-up to /readyz 200: "
        + (startups or "none")
        + ".",
    ]
    if missing:
        head.append(f"- Flags this server does not have (not passed): {', '.join(missing)}.")
    head += [
        f"- Outcome: {passed} expectations met, {failed} failed"
        + (f"; sections that raised: {', '.join(errors)}" if errors else "")
        + ".",
        "",
        "| section | pass | FAIL | error | seconds |",
        "|---|---:|---:|---|---:|",
        *[
            f"| {i}. {s.title} | {s.passed} | {s.failed} | {'error' if s.error else ''} | {s.seconds:.0f} |"
            for i, s in enumerate(sections, 1)
        ],
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(s.markdown(i) for i, s in enumerate(sections, 1))


def run_section(ctx: Context, title: str, fn: Callable[[Context, Section], None]) -> Section:
    sec = Section(title)
    t0 = time.perf_counter()
    print(f"[reliability] {title} ...", flush=True)
    try:
        fn(ctx, sec)
    except Exception as e:  # reported in the doc; the next section runs
        sec.error = f"{type(e).__name__}: {e}"
    sec.seconds = time.perf_counter() - t0
    print(
        f"[reliability] {title}: {sec.passed} pass, {sec.failed} FAIL"
        + (f", error: {sec.error}" if sec.error else "")
        + f" ({sec.seconds:.1f} s)",
        flush=True,
    )
    return sec


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="zoo", help="models directory (default ./zoo)")
    p.add_argument("--out", default="docs/reliability.md", help="the doc to write (default docs/reliability.md)")
    p.add_argument("--quick", action="store_true", help="the short CI version (under ~90 s on 2 cores)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any expectation failed")
    p.add_argument("--only", action="append", help="run only the sections whose title contains this (repeatable)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    work = Path(tempfile.mkdtemp(prefix="fewstep-reliability-"))
    ctx = Context(QUICK if args.quick else FULL, Path(args.models).resolve(), work)
    sections = []
    try:
        for title, fn in SECTIONS:
            if not args.only or any(o.lower() in title.lower() for o in args.only):
                sections.append(run_section(ctx, title, fn))
    finally:
        ctx.close()
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(sections, ctx, argv, seconds, load))
    failed = sum(s.failed + bool(s.error) for s in sections)
    print(
        f"[reliability] wrote {out}: {sum(s.passed for s in sections)} pass, {failed} FAIL or error ({seconds:.0f} s)"
    )
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
