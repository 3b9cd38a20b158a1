"""Warnings a peer can trigger at will (malformed or forged messages), at most one line per kind per
interval, so that a flood of bad messages cannot flood the log too."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Logs the first warning of each kind, then at most one per `interval_s`, saying how many it left out.
    Kinds are the caller's fixed strings; only the IO thread that owns the instance may call it."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval_s:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            msg, args = f"{msg} (%d more like it since the last such line)", (*args, skipped)
        self._last[kind] = now
        self._logger.warning(msg, *args)
