"""Which peers may use a transport's sockets: keys derived from the cluster secret, the tags they make,
and the freshness checks that keep a REGISTER from being replayed.

Frame 1 of every message is a 16-byte tag, HMAC-SHA256 over the header frame (frame 0), truncated. A
REGISTER is tagged with the cluster's register key and carries its issue time and a random nonce; every
other message is tagged with a key of its room and direction (prefill → decode, decode → prefill), which
each side derives from the room id alone, so decode ranks need no key exchange beyond the secret.

Tags cover headers, never tensor frames: authentication costs one HMAC of a few dozen bytes per message,
whatever its size. It keeps out peers that do not hold the secret; it does not hide or protect the KV
bytes from someone on the network path between two servers (run the KV traffic on a trusted network).
Without a secret the keys derive from an empty one, which anybody can: the code path is the same, and the
transport warns that it accepts any peer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TAG_BYTES = 16
NONCE_BYTES = 16
_LABEL = b"tpla-serve disaggregation v3"

UNAUTHENTICATED_WARNING = (
    "%s accepts KV transfer messages from any peer: give every prefill and decode server the same "
    "--disaggregation-secret (or TPLA_DISAGGREGATION_SECRET, or --api-key)"
)


def _mac(key: bytes, data: Any) -> bytes:
    return hmac.digest(key, data, hashlib.sha256)


@dataclass(frozen=True)
class RoomKeys:
    """One room's tag keys: the prefill signs with to_decode, the decode ranks with to_prefill."""

    to_decode: bytes = field(repr=False)
    to_prefill: bytes = field(repr=False)


class ClusterAuth:
    """The keys of one cluster secret (HKDF-style: extract with a label, expand per purpose). It keeps
    derived keys only, never the secret, and its repr shows neither."""

    __slots__ = ("_register", "_rooms", "authenticated")

    def __init__(self, secret: str | None) -> None:
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise ValueError("the disaggregation secret must be a non-empty str")
        master = _mac(_LABEL, (secret or "").encode())
        self.authenticated = secret is not None
        self._register = _mac(master, b"register")
        self._rooms = _mac(master, b"room")

    def __repr__(self) -> str:
        return f"ClusterAuth(authenticated={self.authenticated})"

    @property
    def register_key(self) -> bytes:
        return self._register

    def room_keys(self, room: int) -> RoomKeys:
        r = room.to_bytes(8, "big")
        return RoomKeys(_mac(self._rooms, b"to-decode" + r), _mac(self._rooms, b"to-prefill" + r))


def make_tag(key: bytes, header: Any) -> bytes:
    """The tag of a header frame (bytes-like) under `key`."""
    return _mac(key, header)[:TAG_BYTES]


def signed_by(key: bytes, frames: Sequence[Any]) -> bool:
    """Whether a decoded message's tag (frame 1) is its header's (frame 0) under `key`, compared in
    constant time."""
    return hmac.compare_digest(make_tag(key, frames[0]), memoryview(frames[1]))


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def register_stamp() -> tuple[int, bytes]:
    """A new REGISTER's issue time (this host's wall clock, ms) and random nonce."""
    return wall_clock_ms(), os.urandom(NONCE_BYTES)


class ReplayGuard:
    """Admits a REGISTER's (issue time, nonce) once: issued within ±max_skew_s of this clock, and a nonce
    not seen while it could still pass that check. Holds at most `capacity` nonces; when that many are
    still live, it refuses (a replay could otherwise slip through)."""

    def __init__(self, max_skew_s: float, capacity: int) -> None:
        if max_skew_s <= 0 or capacity < 1:
            raise ValueError("max_skew_s must be positive and capacity at least 1")
        self._skew_ms = int(max_skew_s * 1000)
        self._capacity = capacity
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # nonce -> when it goes stale (ms)

    def refusal(self, issued_ms: int, nonce: bytes, now_ms: int) -> str | None:
        """Why the REGISTER is refused, or None (and its nonce is remembered)."""
        if abs(now_ms - issued_ms) > self._skew_ms:
            return (
                f"issued {(now_ms - issued_ms) / 1000:+.1f}s from this server's clock, outside "
                f"±{self._skew_ms / 1000:g}s"
            )
        while self._seen and next(iter(self._seen.values())) < now_ms:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return "its nonce was already used (a replay)"
        if len(self._seen) >= self._capacity:
            return f"more than {self._capacity} REGISTERs within {2 * self._skew_ms / 1000:g}s"
        self._seen[nonce] = issued_ms + self._skew_ms
        return None
