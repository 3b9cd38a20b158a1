"""Rank 0's control operations to the other TP ranks (DESIGN §7).

Rank 0 schedules; every other rank replays what rank 0 announces. Each announcement is one typed
operation, encoded as a msgpack list [version, tag, *fields] through an explicit tag → class map (never
pickle, never a lookup by name). Both ends are processes of one server, so decoding checks the version,
the tag and the field count and lets the dataclasses take the fields in order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import msgpack
import torch
import torch.distributed as dist

from tpla_serve.forward_batch import BatchEntry, ForwardMode

VERSION = 1
MAX_CONTROL_BYTES = 1 << 30


@dataclass(frozen=True)
class RunStep:
    """Run one target-model step over `entries` (every rank: its shard of every layer)."""

    TAG: ClassVar[int] = 1
    mode: ForwardMode
    entries: list[BatchEntry]


@dataclass(frozen=True)
class RunDraftStep:
    """Run one draft-model step over `entries` (layer-parallel drafting: every rank holds a draft)."""

    TAG: ClassVar[int] = 2
    mode: ForwardMode
    entries: list[BatchEntry]


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


ControlOp = Union[RunStep, RunDraftStep, ExpectRoom, AwaitRoom, CancelRoom, RandomizeKV, Shutdown]
_OPS: dict[int, type] = {
    cls.TAG: cls for cls in (RunStep, RunDraftStep, ExpectRoom, AwaitRoom, CancelRoom, RandomizeKV, Shutdown)
}


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
        elif f.name == "entries":
            value = _pack_entries(value)
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
    if "entries" in kwargs:
        kwargs["entries"] = _unpack_entries(kwargs["entries"])
    return cls(**kwargs)


class ControlChannel:
    """Rank 0's announcements to the other ranks: a length, then the operation's bytes, over a gloo group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def send(self, op: ControlOp) -> None:
        data = encode_op(op)
        dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), src=0, group=self.group)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=self.group)

    def receive(self) -> ControlOp:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.group)
        n = int(size.item())
        if not 0 < n <= MAX_CONTROL_BYTES:
            raise RuntimeError(f"control message of {n} bytes from rank 0 is out of bounds")
        buf = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.group)
        return decode_op(buf.numpy().tobytes())
