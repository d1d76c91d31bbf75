"""Refusals answered by the protocol (server/rejection.py), on a real server built as ``fewstep serve`` builds it:
a saturated engine's 429 comes as soon as the headers are in (before the body, which the Admission middleware
would wait for), in the error shape, and the keep-alive connection carries the next request; requests the app
must see (a wrong key, ``Connection: close``) still take the normal path. Whole requests of a strict subset of
HTTP/1.1 are refused at the wire, before h11: the same bytes as h11's refusal, and anything outside the subset is
left to h11."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

from fewstep.server.rejection import MAX_WIRE_HEAD, EarlyRejection
from tests.server.test_deadlines import Served, read_until_closed, response

pytestmark = pytest.mark.slow
BODY = json.dumps({"prompt": "a red 7 on black", "steps": 1}).encode()


def post(body: bytes = BODY, length: int | None = None, **headers: str) -> bytes:
    size = len(body) if length is None else length
    head = {"host": "t", "content-type": "application/json", "content-length": str(size)}
    lines = ["POST /v1/generate HTTP/1.1", *(f"{k}: {v}" for k, v in {**head, **headers}.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Responses:
    """Reads one HTTP/1.1 response at a time from a socket. Pipelined responses may arrive in one recv(): what
    follows a response's body is kept for the next read (dropping it left the second response unread). Bodies by
    Content-Length only (none here is chunked); a response without one (100 Continue) has none."""

    def __init__(self, s: socket.socket):
        self.s, self.buffer = s, b""
        s.settimeout(30)  # a response that never comes fails the test instead of hanging the suite

    def _fill(self, what: str) -> None:
        chunk = self.s.recv(65536)
        assert chunk, f"the server closed the connection {what}; got {self.buffer[:200]!r}"
        self.buffer += chunk

    def next(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill("before a response")
        head, _, _ = self.buffer.partition(b"\r\n\r\n")
        status, headers, _ = response(head + b"\r\n\r\n")
        end = len(head) + 4 + int(headers.get("content-length", 0))
        while len(self.buffer) < end:
            self._fill("inside a response body")
        body, self.buffer = self.buffer[len(head) + 4 : end], self.buffer[end:]
        return status, headers, body


def rejected(served: Served) -> dict[str, float]:
    """fewstep_rejected_total by path."""
    get = served.app.state.metrics.registry.get_sample_value
    return {path: get("fewstep_rejected_total", {"path": path}) for path in ("wire", "head", "app")}


@pytest.fixture
def saturated(models_dir):
    with Served(models_dir, api_keys=["KEY"]) as served:
        engine = served.app.state.engine
        engine.saturated = lambda: True
        yield served, engine


def test_a_saturated_server_answers_429_before_the_body_and_keeps_the_connection(saturated):
    served, engine = saturated
    with served.connect() as s:
        read_response = Responses(s).next
        # the headers only: the Admission middleware would wait for the 40-byte body; the protocol does not
        s.sendall(post(b"", length=40, authorization="Bearer KEY", **{"x-request-id": "abc-1"}))
        status, headers, body = read_response()
        assert status == 429 and int(headers["retry-after"]) >= 1 and headers["x-request-id"] == "abc-1"
        assert json.loads(body) == {"error": {"message": "the queue is full; retry later", "type": "rate_limit_error",
                                              "param": None, "code": "queue_full"}}  # fmt: skip
        s.sendall(b"x" * 40)  # the refused request's body, skipped
        s.sendall(post(b"not JSON", authorization="Bearer KEY") * 2)  # two pipelined: two refusals
        assert [read_response()[0] for _ in range(2)] == [429, 429]
        del engine.saturated  # the queue has room again: the same connection is served
        s.sendall(post(authorization="Bearer KEY"))
        status, headers, body = read_response()
        assert status == 200 and json.loads(body)["served_by"], body[:200]
    counts = rejected(served)  # the pair is refused at the wire if it arrives after the body, else by h11
    assert counts["app"] == 0 and counts["head"] >= 1 and counts["wire"] + counts["head"] == 3


def test_requests_the_app_must_see_take_the_normal_path(saturated):
    served, _ = saturated
    with served.connect() as s:
        responses = Responses(s)
        s.sendall(post(authorization="Bearer WRONG"))
        assert responses.next()[0] == 401  # a wrong key learns nothing about the queue
        s.sendall(post(authorization="Bearer KEY", connection="close"))  # refused by Admission, then closed as asked
        status, headers, _ = response(responses.buffer + read_until_closed(s))
        assert status == 429 and headers["connection"] == "close"
    assert rejected(served) == {"wire": 0, "head": 0, "app": 1}


def test_expect_100_continue_takes_the_normal_path(saturated):
    """Refused before the body, a client waiting for 100 Continue would be left holding its body: Admission asks
    for it (100 Continue), reads it, then refuses, and the connection stays in step."""
    served, engine = saturated
    with served.connect() as s:
        s.sendall(post(b"", length=len(BODY), authorization="Bearer KEY", expect="100-continue"))
        read_response = Responses(s).next
        assert read_response()[0] == 100  # an interim response: no body
        s.sendall(BODY)
        assert read_response()[0] == 429
        del engine.saturated
        s.sendall(post(authorization="Bearer KEY"))
        assert read_response()[0] == 200


WHOLE = post(authorization="Bearer KEY")


def _variant(old: bytes, new: bytes) -> bytes:
    assert old in WHOLE
    return WHOLE.replace(old, new, 1)


# each a whole request that h11 would frame (or refuse) itself: left to it, never answered at the wire
NOT_AT_THE_WIRE = {
    "query string": _variant(b"/v1/generate ", b"/v1/generate?x=1 "),
    "lower-case method": _variant(b"POST", b"post"),
    "HTTP/1.0": _variant(b"HTTP/1.1", b"HTTP/1.0"),
    "absolute target": _variant(b"POST /v1", b"POST http://t/v1"),
    "no Host": _variant(b"host: t\r\n", b""),
    "two Hosts": _variant(b"host: t\r\n", b"host: t\r\nhost: u\r\n"),
    "two Content-Lengths": _variant(b"content-type", b"content-length: 42\r\ncontent-type"),
    "Content-Length +42": _variant(b"content-length: ", b"content-length: +"),
    "body not all here": WHOLE[:-5],
    "head only": WHOLE[: WHOLE.index(b"\r\n\r\n") + 4],
    "Transfer-Encoding": _variant(b"host: t", b"transfer-encoding: chunked\r\nhost: t"),
    "Expect": _variant(b"host: t", b"expect: 100-continue\r\nhost: t"),
    "Connection: close": _variant(b"host: t", b"connection: close\r\nhost: t"),
    "Upgrade": _variant(b"host: t", b"upgrade: websocket\r\nhost: t"),
    "folded header line": _variant(b"host: t", b"x-a: b\r\n c\r\nhost: t"),
    "space before the colon": _variant(b"host: t", b"host : t"),
    "control byte in a value": _variant(b"host: t", b"x-a: b\x01c\r\nhost: t"),
    "byte 0xff in a value": _variant(b"host: t", b"x-a: b\xffc\r\nhost: t"),
    "bare LF": _variant(b"host: t\r\n", b"host: t\n"),
    "wrong key": _variant(b"Bearer KEY", b"Bearer WRONG"),
    "no key": _variant(b"authorization: Bearer KEY\r\n", b""),
    "two Authorizations": _variant(b"host: t", b"authorization: Bearer KEY\r\nhost: t"),
    "a head over MAX_WIRE_HEAD": _variant(b"host: t", b"x-pad: " + b"a" * MAX_WIRE_HEAD + b"\r\nhost: t"),
}


def test_only_whole_requests_of_the_strict_subset_are_refused_at_the_wire(saturated):
    served, engine = saturated
    wire = EarlyRejection(engine, served.settings, served.app.state.metrics)
    refused = wire.at_the_wire(WHOLE)
    assert refused is not None and refused[1] == len(WHOLE)
    keep_alive = _variant(b"host: t", b"Connection: Keep-Alive\r\nhost: t")
    assert wire.at_the_wire(keep_alive)[1] == len(keep_alive)  # names are case-insensitive; keep-alive is fine
    first, second = wire.at_the_wire(WHOLE + WHOLE), wire.at_the_wire(WHOLE + WHOLE, len(WHOLE))
    assert first[1] == len(WHOLE) and second[1] == 2 * len(WHOLE)  # pipelined: one request at a time
    for name, data in NOT_AT_THE_WIRE.items():
        assert wire.at_the_wire(data) is None, name
    big = post(b"{}" + b" " * served.settings.max_body_bytes, authorization="Bearer KEY")
    assert wire.at_the_wire(big) is None  # the whole body is here, over the limit: h11's path answers 413
    del engine.saturated  # room in the queue
    assert wire.at_the_wire(WHOLE) is None
    engine.saturated = lambda: True
    engine.draining = True
    try:
        assert wire.at_the_wire(WHOLE) is None
    finally:
        engine.draining = False


def test_a_refusal_at_the_wire_is_the_bytes_of_h11s_refusal(saturated):
    """The same request refused before h11 (whole) and by h11 (head first, body later): the same response."""
    served, _ = saturated
    whole = post(authorization="Bearer KEY", **{"x-request-id": "same-1"})
    head, _, body = whole.partition(b"\r\n\r\n")
    answers = []
    for parts in ([whole], [head + b"\r\n\r\n", body]):
        with served.connect() as s:
            for part in parts:
                s.sendall(part)
                time.sleep(0.1)  # separate reads: the head alone cannot be refused at the wire
            s.settimeout(10)
            answers.append(s.recv(65536))
    assert answers[0] == answers[1] and answers[0].startswith(b"HTTP/1.1 429 ")
    assert rejected(served) == {"wire": 1, "head": 1, "app": 0}  # one by each path


def test_refusals_at_the_wire_restart_the_header_deadline(models_dir):
    """A client whose requests are all refused at the wire is between requests after each one: the header
    deadline runs from the last refusal (a connection refused for longer than the deadline stays open), and an
    idle connection is still closed after it."""
    with Served(models_dir, api_keys=["KEY"], header_timeout_s=0.6) as served:
        served.app.state.engine.saturated = lambda: True
        with served.connect() as s:
            responses = Responses(s)
            for _ in range(8):  # 1.6 s of refusals, one every 0.2 s
                s.sendall(WHOLE)
                assert responses.next()[0] == 429
                time.sleep(0.2)
            quiet = time.monotonic()
            assert s.recv(65536) == b""  # closed by the header deadline
            assert 0.1 < time.monotonic() - quiet < 5


def test_refusals_at_the_wire_restart_the_keep_alive_timer(models_dir):
    """The keep-alive timer armed by a served response is restarted by each refusal at the wire, as after any
    response: a connection refused for longer than the keep-alive timeout stays open."""
    served = Served(models_dir, api_keys=["KEY"])
    served.server.config.timeout_keep_alive = 0.5  # uvicorn's idle timeout (5 s by default)
    with served, served.connect() as s:
        responses = Responses(s)
        s.sendall(WHOLE)
        assert responses.next()[0] == 200  # arms the 0.5 s keep-alive timer
        served.app.state.engine.saturated = lambda: True
        for _ in range(6):  # 1.2 s of refusals
            time.sleep(0.2)
            s.sendall(WHOLE)
            assert responses.next()[0] == 429


def test_only_a_connection_between_requests_is_refused_at_the_wire(saturated):
    """A refused head whose body is still to come is h11's: the body, even one that looks like a whole request,
    is that request's body, not a request of its own."""
    served, _ = saturated
    with served.connect() as s:
        responses = Responses(s)
        s.sendall(post(b"", length=len(WHOLE), authorization="Bearer KEY"))
        assert responses.next()[0] == 429  # refused by h11's path at the head
        s.sendall(WHOLE)  # its body
        s.sendall(WHOLE)  # a request of its own
        assert responses.next()[0] == 429
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(65536)  # no third answer
    counts = rejected(served)  # the second request is the wire's if it arrives after the body is done
    assert counts["head"] >= 1 and counts["wire"] + counts["head"] == 2


def test_hostile_raw_requests_are_answered_the_same_while_saturated(saturated):
    """benchmarks/reliability.py's raw hostile requests (section 1) against a saturated server: refusing at the
    wire or at the head must not change how a malformed request is answered. A request the app would refuse for
    its framing (those that close the connection) or its key gets exactly its answer; the rest may be a 429
    (refused before the body is read), never a 5xx."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import reliability  # benchmarks/reliability.py

    served, _ = saturated
    cases = [case for case in reliability.hostile_cases("KEY") if case.raw is not None]
    assert len(cases) >= 20
    statuses = []
    for case in cases:
        with reliability.raw_socket(served.settings.port) as sock:
            for i, part in enumerate(case.raw):
                if i:
                    time.sleep(0.05)
                sock.sendall(part)
            resp = reliability.read_response(sock)
        exact = case.close or 401 in case.expect
        allowed = set(case.expect) if exact else {*case.expect, 429}
        assert resp is not None and resp.status in allowed, (case.name, resp and resp.status)
        statuses.append(resp.status)
    assert 429 in statuses  # saturated: the well-formed ones were refused
