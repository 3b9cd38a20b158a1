"""Per-worker circuit breaker: stop sending traffic to a worker that keeps failing requests.

Health checks see a worker that is down; the breaker sees a worker that answers /health but fails
real requests. Closed -> (failure_threshold consecutive failures) -> open -> (timeout) -> half-open
-> (success_threshold consecutive successes) -> closed; any failure while half-open reopens it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum


class BreakerState(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        success_threshold: int,
        timeout_secs: float,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._failure_threshold = failure_threshold
        self._success_threshold = success_threshold
        self._timeout_secs = timeout_secs
        self._enabled = enabled
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._timeout_secs:
            self._state = BreakerState.HALF_OPEN
            self._successes = 0
        return self._state

    def allows(self) -> bool:
        return not self._enabled or self.state is not BreakerState.OPEN

    def record_success(self) -> None:
        state = self.state
        self._failures = 0
        if state is BreakerState.HALF_OPEN:
            self._successes += 1
            if self._successes >= self._success_threshold:
                self._state = BreakerState.CLOSED

    def record_failure(self) -> None:
        if not self._enabled:
            return
        state = self.state
        self._failures += 1
        if state is BreakerState.HALF_OPEN or self._failures >= self._failure_threshold:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._failures = 0
            self._successes = 0
