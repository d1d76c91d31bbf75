"""A circuit breaker per student: after K consecutive failures its traffic goes to the teacher for a
cool-down; then one trial batch decides whether it closes again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _State:
    failures: int = 0
    opened_at: float | None = None


class CircuitBreaker:
    def __init__(self, threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.threshold, self.cooldown_s, self.clock = threshold, cooldown_s, clock
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()

    def allow(self, name: str) -> bool:
        """False while the circuit is open; after the cool-down the next batch is a trial."""
        with self._lock:
            s = self._states.get(name)
            return s is None or s.opened_at is None or self.clock() - s.opened_at >= self.cooldown_s

    def is_open(self, name: str) -> bool:
        return not self.allow(name)

    def record_success(self, name: str) -> None:
        with self._lock:
            self._states[name] = _State()

    def record_failure(self, name: str) -> None:
        with self._lock:
            s = self._states.setdefault(name, _State())
            s.failures += 1
            if s.failures >= self.threshold:
                s.opened_at = self.clock()  # (re)open; a failed trial restarts the cool-down
