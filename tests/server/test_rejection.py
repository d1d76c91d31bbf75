"""Refusals answered by the protocol (server/rejection.py), on a real server built as ``fewstep serve`` builds it:
a saturated engine's 429 comes as soon as the headers are in (before the body, which the Admission middleware
would wait for), in the error shape, and the keep-alive connection carries the next request; requests the app
must see (a wrong key, ``Connection: close``) still take the normal path."""

from __future__ import annotations

import json
import socket

import pytest

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
    assert served.app.state.metrics.registry.get_sample_value("fewstep_rejected_total") == 3


def test_requests_the_app_must_see_take_the_normal_path(saturated):
    served, _ = saturated
    with served.connect() as s:
        responses = Responses(s)
        s.sendall(post(authorization="Bearer WRONG"))
        assert responses.next()[0] == 401  # a wrong key learns nothing about the queue
        s.sendall(post(authorization="Bearer KEY", connection="close"))  # refused by Admission, then closed as asked
        status, headers, _ = response(responses.buffer + read_until_closed(s))
        assert status == 429 and headers["connection"] == "close"
    assert served.app.state.metrics.registry.get_sample_value("fewstep_rejected_total") == 1


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
