"""One reply from a worker, as the router keeps it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """A finished upstream call; status None means no HTTP response came back (see `error`)."""

    status: int | None
    body: bytes = b""
    content_type: str | None = None
    error: str | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300
