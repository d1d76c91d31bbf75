"""Wake-up coalescing: while the engine is saturated, the event loop polls its sockets every few milliseconds
instead of waking for each arrival.

Under overload requests arrive continuously, and on a CPU host each one wakes the event loop thread, which then
takes a core from one of torch's OpenMP threads in the middle of a batch: the other thread waits for it at the
next barrier, so a 0.1 ms wake-up costs the model more than 0.1 ms. Waking once per window for everything that
arrived in it (most of it refused at the wire, server/rejection.py) turns hundreds of interruptions a second
into a few. Only while the queue is full: a request arriving then is refused or waits for queued batches
anyway, so a few milliseconds more cost it little; with room in the queue the loop wakes at once as usual
(latency is untouched). The end of the device's work ends a window at once: the batcher runs on this loop and
must start the next batch. The window is ``saturated_poll_ms`` (0 turns it off). docs/reliability.md, "Overload",
has the measurement.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
from collections.abc import Callable, Mapping
from typing import Any


class CoalescingSelector(selectors.BaseSelector):
    """The loop's selector: while ``busy()`` is true, ``select`` waits ``window_s`` first, then polls without
    blocking; otherwise it is the wrapped selector. The wait ends early for the loop's own timeout (its next
    timer) and when ``wake`` is set: the engine sets it when the device finishes a slice of work, whose results
    the batcher, on this loop, must hand out before it can start the next one (the device would idle otherwise)."""

    def __init__(self, inner: selectors.BaseSelector, window_s: float, busy: Callable[[], bool], wake: threading.Event):
        self.inner, self.window_s, self.busy, self.wake = inner, window_s, busy, wake

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout != 0 and self.window_s > 0 and self.busy():
            if self.wake.wait(self.window_s if timeout is None or timeout < 0 else min(self.window_s, timeout)):
                self.wake.clear()
            return self.inner.select(0)
        return self.inner.select(timeout)

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.modify(fileobj, events, data)

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self.inner.get_map()

    def close(self) -> None:
        self.inner.close()


def loop_factory(
    window_s: float, busy: Callable[[], bool], wake: threading.Event
) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of asyncio event loops whose selector coalesces wake-ups while ``busy()``, until ``wake``."""

    def new_loop() -> asyncio.AbstractEventLoop:
        return asyncio.SelectorEventLoop(CoalescingSelector(selectors.DefaultSelector(), window_s, busy, wake))

    return new_loop
