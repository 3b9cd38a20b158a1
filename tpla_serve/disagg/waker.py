"""A self-pipe to wake a thread that sleeps in a poller."""

from __future__ import annotations

import os


class Waker:
    """A non-blocking self-pipe: its read end sits in a poller (zmq or select) until someone wakes it."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:  # the pipe is full, so a wake-up is already pending
            pass

    def drain(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)
