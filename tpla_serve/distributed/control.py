"""Rank 0's control operations to the other TP ranks (DESIGN §7).

Rank 0 schedules; every other rank replays what rank 0 announces. Each announcement is one typed
operation, encoded as a msgpack list [version, tag, *fields] through an explicit tag → class map (never
pickle, never a lookup by name), sent over ZMQ from rank 0 to every other rank. Both ends are processes of
one server, so decoding checks the version, the tag and the field count and lets the dataclasses take the
fields in order.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import msgpack
import numpy as np
import zmq

from tpla_serve.distributed.liveness import Disconnects, PeerWatch, enable_heartbeats
from tpla_serve.forward_batch import BatchEntry, ForwardMode, TableDelta

VERSION = 1
MAX_CONTROL_BYTES = 1 << 30
ALIVE_CHECK_MS = 1000


@dataclass(frozen=True)
class RunStep:
    """Apply `delta` to the request table, then run one target-model step over `entries` (every rank: its
    shard of every layer); then take rank 0's sampled tokens for `sample_slots` (a broadcast)."""

    TAG: ClassVar[int] = 1
    mode: ForwardMode
    entries: list[BatchEntry]
    delta: TableDelta
    sample_slots: np.ndarray  # [S] int64


@dataclass(frozen=True)
class RunDecode:
    """Apply `delta`, then run one decode step of the requests in `slots` (one token each, at `positions`,
    inputs gathered from the request table); then take rank 0's sampled tokens for them (a broadcast)."""

    TAG: ClassVar[int] = 8
    slots: np.ndarray  # [B] int64
    positions: np.ndarray  # [B] int64: KV tokens each request has cached, the new token's position
    delta: TableDelta


@dataclass(frozen=True)
class RunDraftStep:
    """Run one draft-model step over `entries` (layer-parallel drafting: every rank holds a draft)."""

    TAG: ClassVar[int] = 2
    mode: ForwardMode
    entries: list[BatchEntry]


@dataclass(frozen=True)
class RunDraftBlock:
    """Apply `delta`, then draft one speculation block (every rank holds a draft, EasySpec across ranks):
    the exact calibration step over `calibration` (`mode`), then k_max - 1 decode steps of the requests in
    `slots`, request b drafting num_drafts[b] >= 1 tokens from `positions` on, inputs gathered from the
    request table; each step takes rank 0's sampled tokens (a broadcast), or with `local_argmax` (every draft
    greedy from the raw draft logits) the argmax of its own logits, the same on every rank. One message per
    block."""

    TAG: ClassVar[int] = 9
    mode: ForwardMode
    calibration: list[BatchEntry]
    slots: np.ndarray  # [B] int64
    positions: np.ndarray  # [B] int64: the position of each request's first draft token
    num_drafts: np.ndarray  # [B] int64, >= 1
    delta: TableDelta
    local_argmax: bool = False


@dataclass(frozen=True)
class ExpectRoom:
    """PD decode: start accepting a bootstrap room's KV into `pages`; a barrier follows."""

    TAG: ClassVar[int] = 3
    room: int
    n_tokens: int
    pages: list[int]
    host: str
    port: int | None


@dataclass(frozen=True)
class AwaitRoom:
    """PD decode: rank 0 holds the room's KV; wait for this rank's slice, then vote on its draft KV."""

    TAG: ClassVar[int] = 4
    room: int


@dataclass(frozen=True)
class CancelRoom:
    """PD decode: stop accepting a room's KV (its request ended)."""

    TAG: ClassVar[int] = 5
    room: int
    message: str


@dataclass(frozen=True)
class RandomizeKV:
    """Fill the KV pools with random values (decode speed runs skip prefill)."""

    TAG: ClassVar[int] = 6
    seed: int


@dataclass(frozen=True)
class Shutdown:
    """Leave the TP group and exit."""

    TAG: ClassVar[int] = 7


ControlOp = Union[
    RunStep, RunDecode, RunDraftStep, RunDraftBlock, ExpectRoom, AwaitRoom, CancelRoom, RandomizeKV, Shutdown
]
_OPS: dict[int, type] = {
    cls.TAG: cls
    for cls in (
        RunStep, RunDecode, RunDraftStep, RunDraftBlock, ExpectRoom, AwaitRoom, CancelRoom, RandomizeKV,
        Shutdown,
    )
}
_ENTRY_FIELDS = frozenset({"entries", "calibration"})  # lists of BatchEntry
# int64 arrays, sent as raw bytes
_ARRAY_FIELDS = frozenset({"sample_slots", "slots", "positions", "num_drafts"})


def _pack_entries(entries: list[BatchEntry]) -> list[list[Any]]:
    return [[e.new_token_ids, e.prefix_len, e.pages, e.logits_for_all] for e in entries]


def _unpack_entries(rows: list[list[Any]]) -> list[BatchEntry]:
    return [BatchEntry(ids, prefix, pages, bool(all_rows)) for ids, prefix, pages, all_rows in rows]


def encode_op(op: ControlOp) -> bytes:
    fields: list[Any] = []
    for f in dataclasses.fields(op):
        value = getattr(op, f.name)
        if isinstance(value, ForwardMode):
            value = value.value
        elif f.name in _ENTRY_FIELDS:
            value = _pack_entries(value)
        elif f.name == "delta":
            value = value.to_bytes()
        elif f.name in _ARRAY_FIELDS:
            value = np.ascontiguousarray(value, dtype=np.int64).tobytes()
        fields.append(value)
    return msgpack.packb([VERSION, op.TAG, *fields], use_bin_type=True)


def decode_op(data: bytes) -> ControlOp:
    obj = msgpack.unpackb(data, raw=False)
    if not isinstance(obj, list) or len(obj) < 2 or obj[0] != VERSION:
        raise ValueError("not a control operation of this server's protocol version")
    cls = _OPS.get(obj[1])
    if cls is None:
        raise ValueError(f"unknown control operation tag {obj[1]!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    values = obj[2:]
    if len(values) != len(names):
        raise ValueError(f"{cls.__name__} takes {len(names)} fields, got {len(values)}")
    kwargs = dict(zip(names, values))
    if "mode" in kwargs:
        kwargs["mode"] = ForwardMode(kwargs["mode"])
    for name in _ENTRY_FIELDS & kwargs.keys():
        kwargs[name] = _unpack_entries(kwargs[name])
    if "delta" in kwargs:
        kwargs["delta"] = TableDelta.from_bytes(kwargs["delta"])
    for name in _ARRAY_FIELDS & kwargs.keys():
        kwargs[name] = np.frombuffer(bytearray(kwargs[name]), dtype=np.int64)  # writable, for torch
    return cls(**kwargs)


class ControlSender:
    """Rank 0's end: one PUSH socket per other rank (a queue each; nothing is lost to a slow joiner), and
    the watch over their connections. `endpoints` maps each other rank to its PULL endpoint; `heartbeats`
    (ranks on other hosts) also catches a peer that went silent without closing its connection."""

    def __init__(self, endpoints: dict[int, str], heartbeats: bool = False) -> None:
        self.ctx = zmq.Context()
        self.sockets = []
        for endpoint in endpoints.values():
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)  # rank 0 never drops or blocks on an announcement
            sock.setsockopt(zmq.LINGER, 1000)
            if heartbeats:
                enable_heartbeats(sock)
            sock.connect(endpoint)
            self.sockets.append(sock)
        self.watch = PeerWatch(self.sockets, [f"TP rank {r} ({e})" for r, e in endpoints.items()])

    def send(self, op: ControlOp) -> None:
        data = encode_op(op)
        for sock in self.sockets:
            sock.send(data, copy=False)

    def close(self) -> None:
        self.watch.stop()
        for sock in self.sockets:
            sock.close()
        self.ctx.term()


class RankZeroGone(RuntimeError):
    """Rank 0's process ended, or its host stopped answering: a rank > 0 has nobody left to serve."""


class ControlReceiver:
    """A rank's end: a PULL socket it blocks on between operations (an idle rank costs no CPU and never
    times out), waking once a second only to check that rank 0 (and the process that started this rank)
    is still there."""

    def __init__(self, host: str = "127.0.0.1", heartbeats: bool = False) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)
        self.sock.setsockopt(zmq.LINGER, 0)
        if heartbeats:
            enable_heartbeats(self.sock)
        self.disconnects = Disconnects(self.sock)
        port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self.parent_pid = os.getppid()

    def receive(self) -> ControlOp:
        while not self.sock.poll(ALIVE_CHECK_MS):
            if os.getppid() != self.parent_pid:
                raise RankZeroGone("the process that started this rank is gone")
            if self.disconnects.check():
                raise RankZeroGone("rank 0 disconnected: its process or its host is gone")
        return decode_op(self.sock.recv())

    def close(self) -> None:
        self.disconnects.close()
        self.sock.close()
        self.ctx.term()
