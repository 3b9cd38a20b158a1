"""One finished reply from a worker, as the info and admin endpoints keep it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """A finished upstream call; status None means no HTTP response came back (see `error`)."""

    status: int | None
    body: bytes = b""
    content_type: bytes | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300
