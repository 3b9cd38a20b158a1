"""Where a registered room's KV goes and in which messages (the sender's IO thread sends them).

Each decode rank gets its group's r/g latent dims of every target layer plus the full k_pe; ranks of one
latent group share the slice's bytes. The draft's layers go whole to the ranks that keep a draft pool.
Messages are cut so that no frame exceeds the decode's max_frame_bytes, in whole pages where possible.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tpla_serve.disagg.handshake import KVSpec, draft_mismatch
from tpla_serve.disagg.messages import Frame, LayerKV, Register, encode
from tpla_serve.disagg.staging import Holds, StagingPool

if TYPE_CHECKING:
    from tpla_serve.disagg.sender_rooms import LayerCmd

logger = logging.getLogger(__name__)
_MAX_WARNED = 1024


@dataclass
class Routes:
    key: bytes = field(repr=False)  # the room's prefill → decode tag key
    targets: list[tuple[str, int, int]]  # per decode rank: its endpoint and latent slice [a, b)
    chunk_tokens: int  # tokens per message
    lanes: int = 1  # connections per decode rank: layer l goes on lane l % lanes (SenderRoom.lane)
    send_draft: bool = False  # the decode wants this prefill's draft KV
    draft_targets: list[str] = field(default_factory=list)  # endpoints of the ranks that keep a draft
    draft_chunk_tokens: int = 0


def _chunk_tokens(max_frame_bytes: int, widest_row_bytes: int, page_size: int) -> int:
    chunk = max(1, max_frame_bytes // widest_row_bytes)
    return chunk - chunk % page_size if chunk >= page_size else chunk


def plan_routes(reg: Register, kv: KVSpec, draft: KVSpec | None, key: bytes) -> tuple[Routes, str | None]:
    """The room's routes (messages tagged with `key`), and why its draft KV cannot be sent (None when it
    can, or is not wanted)."""
    layout = reg.layout
    routes = Routes(
        key=key,
        targets=[(e, *layout.latent_slice(rank)) for rank, e in enumerate(reg.rank_endpoints)],
        chunk_tokens=_chunk_tokens(reg.max_frame_bytes, max(layout.ckv_width, kv.rope_dim) * kv.itemsize,
                                   layout.page_size),
        lanes=reg.lanes,
    )
    problem = draft_mismatch(draft, layout)
    if problem is None and draft is not None and layout.draft is not None:
        routes.send_draft = True
        routes.draft_targets = [reg.rank_endpoints[r] for r in layout.draft_ranks]
        routes.draft_chunk_tokens = _chunk_tokens(
            reg.max_frame_bytes, max(draft.kv_lora_rank, draft.rope_dim) * draft.itemsize, layout.page_size
        )
    return routes, problem


# endpoint, frames, payload bytes, the buffers it reads, what fills them before it goes out (or None)
Message = tuple[str, list[Frame], int, tuple[Holds, ...], Callable[[], None] | None]


class _Fill:
    """Fills a message's frames once, on whichever lane thread sends the first message that reads them:
    waits for the engine's copies to pinned staging (`ready`, CUDA events) and copies latent slices."""

    def __init__(self, ready: list[Any], copies: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self._ready, self._copies = ready, copies
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            for event in self._ready:
                event.synchronize()
            for dst, src in self._copies:
                np.copyto(dst, src)
            self._done, self._copies = True, []


@dataclass
class _Rows:
    """Rows [s, e) of a message's layers for one latent group: ĉ and k_pe frames per layer, the buffers
    they read, what fills them before they go out, and the hold of the slice staged for them (dropped once
    its messages hold it)."""

    frames: list[Any]
    holds: tuple[Holds, ...]
    fill: Callable[[], None] | None
    own: Holds | None = None


def _rows(cmds: list[LayerCmd], s: int, e: int, a: int, b: int, staging: StagingPool) -> _Rows:
    """Rows [s, e) of the layers for the latent group of dims [a, b). Whole rows, and groups a GPU staged
    apart, go from the layers' own memory; a slice of host rows is copied, every layer's into one staging
    buffer (one buffer, hold and fill per message and group: the per-layer bookkeeping cost more than the
    copy of a short prompt's rows)."""
    first = cmds[0]  # the layers of one message share latent_groups and staging (RoomStreamer._joins)
    width = first.ckv.shape[-1]
    base = tuple(cmd.holds for cmd in cmds if cmd.holds is not None)
    ready = [cmd.ready for cmd in cmds if cmd.ready is not None]
    kpes = [cmd.row_bytes[1][s:e].reshape(-1) for cmd in cmds]
    if first.latent_groups > 1 or b - a == width:
        ckvs = [cmd.row_bytes[0] for cmd in cmds]
        if first.latent_groups > 1:
            assert b - a == width and a % width == 0, f"latent slice [{a}, {b}) is not one of the groups"
            ckvs = [ckv[a // width] for ckv in ckvs]
        frames = [f for ckv, kpe in zip(ckvs, kpes) for f in (ckv[s:e].reshape(-1), kpe)]
        return _Rows(frames, base, _Fill(ready, []) if ready else None)
    size = first.ckv.element_size()
    row = (b - a) * size
    buf = staging.acquire(len(cmds) * (e - s) * row)
    own = Holds(staging, [buf])
    dst = buf.numpy().reshape(len(cmds), e - s, row)
    copies = [(dst[i], cmd.row_bytes[0][s:e, a * size : b * size]) for i, cmd in enumerate(cmds)]
    frames = [f for i, kpe in enumerate(kpes) for f in (dst[i].reshape(-1), kpe)]
    return _Rows(frames, (own, *base), _Fill(ready, copies), own)


def target_layer_messages(
    routes: Routes, room: int, cmds: list[LayerCmd], staging: StagingPool
) -> Iterator[Message]:
    """Target layers' rows, every decode rank its slice: a rank of g > 1 gets its latent dims copied into
    staging (shared by the ranks of its group, as is the encoded message) by the lane that sends it, the
    rest goes from the layers' own tensors. Several layers (consecutive, the same tokens, within one chunk)
    make one message."""
    n = cmds[0].n_tokens
    for s in range(0, n, routes.chunk_tokens):
        e = min(n, s + routes.chunk_tokens)
        groups: dict[int, tuple[_Rows, list[Frame], int]] = {}
        for endpoint, a, b in routes.targets:
            if a not in groups:
                rows = _rows(cmds, s, e, a, b, staging)
                groups[a] = (rows, *_message(routes, room, cmds, s, e, rows))
            rows, frames, nbytes = groups[a]
            yield endpoint, frames, nbytes, _hold(rows), rows.fill
        for rows, *_ in groups.values():
            if rows.own is not None:
                rows.own.drop()  # the slice's own hold: its messages hold it now


def draft_layer_messages(
    routes: Routes, room: int, cmds: list[LayerCmd], staging: StagingPool
) -> Iterator[Message]:
    """Draft layers' rows, whole, to every rank with a draft (several layers in one message as above)."""
    n = cmds[0].n_tokens
    for s in range(0, n, routes.draft_chunk_tokens):
        e = min(n, s + routes.draft_chunk_tokens)
        rows = _rows(cmds, s, e, 0, cmds[0].ckv.shape[1], staging)
        frames, nbytes = _message(routes, room, cmds, s, e, rows)
        for endpoint in routes.draft_targets:
            yield endpoint, frames, nbytes, _hold(rows), rows.fill


def _message(
    routes: Routes, room: int, cmds: list[LayerCmd], s: int, e: int, rows: _Rows
) -> tuple[list[Frame], int]:
    """One LAYER_KV of rows [s, e) of the layers in `cmds`, encoded: its frames and payload bytes."""
    first, payload = cmds[0], rows.frames
    msg = LayerKV(room, first.layer, first.token_start + s, e - s, payload[0], payload[1], len(cmds),
                  tuple(payload[2:]))
    return encode(msg, routes.key), sum(f.nbytes for f in payload)


def _hold(rows: _Rows) -> tuple[Holds, ...]:
    """One more hold on every buffer the rows read, for one message that reads them."""
    return tuple(h.hold() for h in rows.holds)


class OncePerPeer:
    """Logs that a decode server's rooms go without draft KV once per server and reason, not per room."""

    def __init__(self) -> None:
        self._warned: set[tuple[str, str]] = set()

    def warn(self, peer: str, problem: str) -> None:
        if (peer, problem) in self._warned:
            return
        if len(self._warned) >= _MAX_WARNED:
            self._warned.clear()
        self._warned.add((peer, problem))
        logger.warning("decode %s: %s; its rooms get the target's KV only and prefill their draft locally", peer, problem)
