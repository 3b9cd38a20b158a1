"""The scheduler's watchdog (--watchdog-timeout): a step that runs too long stops the server.

A step stuck in a kernel or in a collective with a stopped rank never returns, so nothing inside it can
give up: a thread watches the step's start time and, once it is older than the timeout, calls
`on_timeout` (the scheduler process tells the front, whose /health then fails and whose requests get a
503, and ends its process group). Steps mark their start and end with two lock operations; the thread
sleeps while the scheduler is idle and wakes about once per timeout while it is busy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StepWatchdog:
    def __init__(self, timeout_s: float, on_timeout: Callable[[str], None]) -> None:
        self.timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._cond = threading.Condition()
        self._started: float | None = None  # when the running step began
        self._idle_wait = False  # the thread waits for a step to begin (no timeout)
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def step(self) -> Iterator[None]:
        with self._cond:
            self._started = time.monotonic()
            if self._idle_wait:
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._started = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _watch(self) -> None:
        with self._cond:
            while not self._overdue():
                if self._stopped:
                    return
                if self._started is None:
                    self._idle_wait = True
                    self._cond.wait()
                    self._idle_wait = False
                else:
                    self._cond.wait(self._started + self.timeout_s - time.monotonic())
        self._on_timeout(f"a scheduler step has run for more than --watchdog-timeout {self.timeout_s:g} s; the "
                         "server stops instead of hanging (a stuck kernel, or a TP rank that stopped responding)")

    def _overdue(self) -> bool:
        return self._started is not None and time.monotonic() - self._started >= self.timeout_s
