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
    waits for the engine's copy to pinned staging (`ready`, a CUDA event) and copies a latent slice."""

    def __init__(self, ready: Any, dst: np.ndarray | None = None, src: np.ndarray | None = None) -> None:
        self._ready, self._dst, self._src = ready, dst, src
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            if self._ready is not None:
                self._ready.synchronize()
            if self._dst is not None and self._src is not None:
                np.copyto(self._dst, self._src)
            self._done, self._src = True, None


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
        groups: dict[int, tuple[list[_Part], list[Frame], int, Callable[[], None] | None]] = {}
        for endpoint, a, b in routes.targets:
            if a not in groups:
                parts = [_slice(cmd, s, e, a, b, staging) for cmd in cmds]
                groups[a] = (parts, *_message(routes, room, cmds, s, e, parts))
            parts, frames, nbytes, fill = groups[a]
            yield endpoint, frames, nbytes, _hold(parts), fill
        for parts, *_ in groups.values():
            for p in parts:
                if p.own is not None:
                    p.own.drop()  # the slice's own hold: its messages hold it now


@dataclass
class _Part:
    """One layer's rows for one latent group: its frames, the buffers they read, what fills them before
    they go out, and the hold of a slice staged for them (dropped once its messages hold it)."""

    ckv: Any
    kpe: Any
    holds: tuple[Holds, ...]
    fill: Callable[[], None] | None
    own: Holds | None = None


def _slice(cmd: LayerCmd, s: int, e: int, a: int, b: int, staging: StagingPool) -> _Part:
    """Rows [s, e) of one layer for the latent group of dims [a, b)."""
    ckv_rows, kpe_rows = cmd.row_bytes
    base = () if cmd.holds is None else (cmd.holds,)
    kpe_frame = kpe_rows[s:e].reshape(-1)
    width = cmd.ckv.shape[-1]
    if cmd.latent_groups > 1 or b - a == width:  # the whole rows, or a group staged by the device: no copy
        if cmd.latent_groups > 1:
            assert b - a == width and a % width == 0, f"latent slice [{a}, {b}) is not one of the groups"
            ckv_rows = ckv_rows[a // width]
        fill = None if cmd.ready is None else _Fill(cmd.ready)
        return _Part(ckv_rows[s:e].reshape(-1), kpe_frame, base, fill)
    size = cmd.ckv.element_size()
    buf = staging.acquire((e - s) * (b - a) * size)
    own = Holds(staging, [buf])
    dst = buf.numpy()
    fill = _Fill(cmd.ready, dst.reshape(e - s, (b - a) * size), ckv_rows[s:e, a * size : b * size])
    return _Part(dst, kpe_frame, (own, *base), fill, own)


def _all(fills: list[Callable[[], None]]) -> Callable[[], None] | None:
    if not fills:
        return None
    if len(fills) == 1:
        return fills[0]
    def fill_all() -> None:
        for fill in fills:
            fill()

    return fill_all


def draft_layer_messages(
    routes: Routes, room: int, cmds: list[LayerCmd], staging: StagingPool
) -> Iterator[Message]:
    """Draft layers' rows, whole, to every rank with a draft (several layers in one message as above)."""
    n = cmds[0].n_tokens
    for s in range(0, n, routes.draft_chunk_tokens):
        e = min(n, s + routes.draft_chunk_tokens)
        parts = [_slice(cmd, s, e, 0, cmd.ckv.shape[1], staging) for cmd in cmds]
        frames, nbytes, fill = _message(routes, room, cmds, s, e, parts)
        for endpoint in routes.draft_targets:
            yield endpoint, frames, nbytes, _hold(parts), fill


def _message(
    routes: Routes, room: int, cmds: list[LayerCmd], s: int, e: int, parts: list[_Part]
) -> tuple[list[Frame], int, Callable[[], None] | None]:
    """One LAYER_KV of rows [s, e) of the layers in `cmds`, encoded: its frames, payload bytes and fill."""
    first = cmds[0]
    payload = [f for p in parts for f in (p.ckv, p.kpe)]
    msg = LayerKV(room, first.layer, first.token_start + s, e - s, payload[0], payload[1], len(cmds),
                  tuple(payload[2:]))
    fill = _all([p.fill for p in parts if p.fill is not None])
    return encode(msg, routes.key), sum(f.nbytes for f in payload), fill


def _hold(parts: list[_Part]) -> tuple[Holds, ...]:
    """One more hold on every buffer the parts read, for one message that reads them."""
    return tuple(h.hold() for p in parts for h in p.holds)


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
