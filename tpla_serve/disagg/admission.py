"""The prefill's bootstrap socket, what it lets in, and what each decode server may hold once it is in.

A message counts only when it decodes, carries its key's tag (a REGISTER: the cluster's register key; an
ABORT: its room's decode → prefill key) and, for a REGISTER, is fresh and not a replay. Everything else is
counted and dropped before it can take a room slot, open a socket or write more than a rate-limited log
line. A decode server is known by its REGISTERs' notify endpoint (its rank 0); limits per decode server
keep one of them (misconfigured, overloaded or misbehaving) from taking every room slot or every socket.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from tpla_serve.disagg.auth import ClusterAuth, ReplayGuard, signed_by, wall_clock_ms
from tpla_serve.disagg.bootstrap import tcp_endpoint
from tpla_serve.disagg.io_loop import bind_tcp, peer_address
from tpla_serve.disagg.transport import DataSender
from tpla_serve.disagg.log_limit import RateLimitedLog
from tpla_serve.disagg.messages import MAX_HEADER_BYTES, Abort, ProtocolError, Register, decode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerLimits:
    """What one decode server may hold on a prefill at a time."""

    max_rooms: int = 512  # registered rooms in flight
    max_endpoints: int = 64  # distinct endpoints its rooms name (T rank endpoints and the notify endpoint)

    def __post_init__(self) -> None:
        if self.max_rooms < 1 or self.max_endpoints < 1:
            raise ValueError(f"peer limits must be positive, got {self}")


@dataclass
class _Peer:
    rooms: int = 0
    endpoints: Counter[str] = field(default_factory=Counter)  # endpoint -> live rooms naming it


def _endpoints(reg: Register) -> list[str]:
    return list(dict.fromkeys((*reg.rank_endpoints, reg.notify_endpoint)))


class PeerTable:
    """Live registered rooms per decode server and the endpoints they name (IO thread only)."""

    def __init__(self, limits: PeerLimits) -> None:
        self.limits = limits
        self._peers: dict[str, _Peer] = {}

    def endpoint_refusal(self, reg: Register, out: DataSender) -> str | None:
        """Why the prefill may not send to the endpoints `reg` names, or None."""
        names = _endpoints(reg)
        peer = self._peers.get(reg.notify_endpoint)
        named = len(set(names) | (peer.endpoints.keys() if peer is not None else set()))
        if named > self.limits.max_endpoints:
            return (
                f"decode server {reg.notify_endpoint} names {named} endpoints, more than the "
                f"{self.limits.max_endpoints} one decode server may use"
            )
        new = sum(not out.is_open(e) for e in names) * reg.lanes
        if out.connections() + new > out.max_connections:
            return (
                f"prefill has {out.connections()} of its {out.max_connections} connections to decode servers "
                f"open; the room needs {new} more"
            )
        return None

    def room_refusal(self, reg: Register) -> str | None:
        peer = self._peers.get(reg.notify_endpoint)
        if peer is not None and peer.rooms >= self.limits.max_rooms:
            return (
                f"decode server {reg.notify_endpoint} already has {peer.rooms} rooms in flight on this "
                f"prefill (at most {self.limits.max_rooms})"
            )
        return None

    def add(self, reg: Register) -> None:
        peer = self._peers.setdefault(reg.notify_endpoint, _Peer())
        peer.rooms += 1
        peer.endpoints.update(_endpoints(reg))

    def remove(self, reg: Register) -> None:
        peer = self._peers[reg.notify_endpoint]
        peer.rooms -= 1
        peer.endpoints.subtract(_endpoints(reg))
        peer.endpoints = +peer.endpoints  # drop endpoints no live room names
        if peer.rooms == 0:
            del self._peers[reg.notify_endpoint]


class BootstrapGate:
    """The bootstrap socket (a PULL bound on host:port) and the checks its messages pass; the socket
    belongs to the IO thread that polls it."""

    def __init__(
        self,
        ctx: zmq.Context,
        host: str,
        port: int,
        auth: ClusterAuth,
        max_skew_s: float,
        replay_capacity: int,
        limits: PeerLimits,
    ) -> None:
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER_BYTES)
        self.port = bind_tcp(self.socket, host, port)
        self.endpoint = tcp_endpoint(host, self.port)
        self.auth = auth
        self.peers = PeerTable(limits)
        self._replay = ReplayGuard(max_skew_s, replay_capacity)
        self._log = RateLimitedLog(logger)
        self.rejected = 0  # malformed
        self.unauthenticated = 0  # a wrong tag, a stale or replayed REGISTER

    def receive(self, max_messages: int) -> Iterator[Register | Abort]:
        """The messages waiting on the socket (at most max_messages read) that may act on rooms."""
        for _ in range(max_messages):
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = self._admit(frames)
            if msg is not None:
                yield msg

    def _admit(self, frames: Sequence[Any]) -> Register | Abort | None:
        """The message in `frames`, or None when it is malformed or unauthenticated (counted, dropped)."""
        try:
            msg = decode(frames)
            if not isinstance(msg, (Register, Abort)):
                raise ProtocolError(f"{type(msg).__name__} is not a bootstrap message")
        except ProtocolError as exc:
            self.rejected += 1
            self._log.warning(
                "malformed", "rejected a bootstrap message from %s: %s", peer_address(frames), exc
            )
            return None
        problem = self._refusal(msg, frames)
        if problem is not None:
            self.unauthenticated += 1
            self._log.warning(
                "unauthenticated",
                "refused %s for room %d from %s: %s",
                type(msg).__name__.upper(),
                msg.room,
                peer_address(frames),
                problem,
            )
            return None
        return msg

    def _refusal(self, msg: Register | Abort, frames: Sequence[Any]) -> str | None:
        if isinstance(msg, Abort):
            key = self.auth.room_keys(msg.room).to_prefill
        else:
            key = self.auth.register_key
        if not signed_by(key, frames):
            return "its tag is wrong (is --disaggregation-secret the same on both servers?)"
        if isinstance(msg, Register):
            return self._replay.refusal(msg.issued_ms, msg.nonce, wall_clock_ms())
        return None
