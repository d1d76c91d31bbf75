"""server/coalesce.py: while the engine is saturated the event loop's selector waits a window before polling
(one wake-up for everything that arrived in it), otherwise it is the plain selector; ``fewstep serve``'s loop
(build_server) uses it."""

from __future__ import annotations

import selectors
import socket
import threading
import time

import pytest

from fewstep.server.coalesce import CoalescingSelector
from tests.server.test_deadlines import Served
from tests.server.test_rejection import WHOLE, Responses


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def timed_select(selector: CoalescingSelector, timeout: float | None) -> tuple[float, int]:
    t0 = time.perf_counter()
    events = selector.select(timeout)
    return time.perf_counter() - t0, len(events)


def test_the_selector_waits_a_window_only_while_busy(pair):
    a, b = pair
    busy, wake = [False], threading.Event()
    selector = CoalescingSelector(selectors.DefaultSelector(), 0.2, lambda: busy[0], wake)
    selector.register(a, selectors.EVENT_READ)
    b.send(b"x")
    elapsed, n = timed_select(selector, None)
    assert n == 1 and elapsed < 0.15  # not busy: ready data is returned at once
    busy[0] = True
    elapsed, n = timed_select(selector, None)
    assert n == 1 and elapsed >= 0.19  # busy: the window first, then everything ready
    elapsed, n = timed_select(selector, 0.05)
    assert n == 1 and 0.045 <= elapsed < 0.15  # the loop's own timeout (its next timer) ends the window early
    elapsed, n = timed_select(selector, 0)
    assert n == 1 and elapsed < 0.05  # a poll stays a poll
    a.recv(1)
    elapsed, n = timed_select(selector, None)
    assert n == 0 and elapsed >= 0.19  # nothing arrived in the window: the loop comes back to select again
    threading.Timer(0.03, wake.set).start()  # the device finished: the window ends at once
    elapsed, n = timed_select(selector, None)
    assert n == 0 and elapsed < 0.15 and not wake.is_set()
    selector.unregister(a)
    assert not selector.get_map()
    selector.close()


@pytest.mark.slow
@pytest.mark.parametrize(("poll_ms", "at_least_s"), [(100, 0.09), (0, 0.0)])
def test_fewstep_serve_loop_coalesces_while_saturated(models_dir, poll_ms, at_least_s):
    """On the server's own loop: with the queue full a refusal waits for the polling window; with the window
    off it is answered at once."""
    with Served(models_dir, api_keys=["KEY"], saturated_poll_ms=poll_ms) as served, served.connect() as s:
        responses = Responses(s)
        served.app.state.engine.saturated = lambda: True
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            s.sendall(WHOLE)
            assert responses.next()[0] == 429
            times.append(time.perf_counter() - t0)
        # the loop wakes after the window or at its next timer (uvicorn ticks every 0.1 s), whichever is first
        assert max(times) >= at_least_s
        if poll_ms == 0:
            assert max(times) < 0.05  # a refusal at the wire costs microseconds
        engine = served.app.state.engine
        del engine.saturated  # room again: served
        engine.device_done.clear()
        s.sendall(WHOLE)
        assert responses.next()[0] == 200
        assert engine.device_done.is_set()  # the batch's end is signalled to the selector
