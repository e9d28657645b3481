"""A circuit breaker for the generator: stop sending work to a stage that keeps failing, answer
from what is at hand (sources only) at once, and let one trial through after a pause.

    closed --(failure_threshold consecutive failures)--> open --(reset_timeout_s)--> half-open
    half-open --(the trial succeeds)--> closed;  half-open --(the trial fails)--> open

Its state is exported as ``rag_generator_breaker_state`` (0 closed, 1 half-open, 2 open). Each
ingress replica keeps its own breaker: it guards that replica's view of the generator.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
NAMES = {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}


class CircuitBreaker:
    def __init__(
        self, *, failure_threshold: int, reset_timeout_s: float, clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        if failure_threshold < 1 or reset_timeout_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and reset_timeout_s > 0")
        self.failure_threshold, self.reset_timeout_s = failure_threshold, reset_timeout_s
        self.clock, self.on_change = clock, on_change
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._trial = False
        self._lock = threading.Lock()

    def _set(self, state: int) -> None:
        if state != self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change(state)

    def allow(self) -> bool:
        """May a call go through now? In half-open only one trial is in flight at a time."""
        with self._lock:
            if self.state == CLOSED:
                return True
            if self.state == OPEN and self.clock() - self.opened_at >= self.reset_timeout_s:
                self._set(HALF_OPEN)
                self._trial = False
            if self.state == HALF_OPEN and not self._trial:
                self._trial = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self.failures = 0
            self._trial = False
            self._set(CLOSED)

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            self._trial = False
            if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
                self.opened_at = self.clock()
                self._set(OPEN)

    def release(self) -> None:
        """A call ended with no verdict on the generator (the client went away): free the trial slot."""
        with self._lock:
            self._trial = False

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when not open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.reset_timeout_s - (self.clock() - self.opened_at))

    def describe(self) -> str:
        if self.state == OPEN:
            return (f"circuit open after {self.failures} consecutive generator failures; "
                    f"next trial in {self.retry_in():.0f} s")
        return NAMES[self.state]
