"""Where a decode rank's received KV goes: a room's own pages of the rank's pool (and its draft pool).

On the CPU the receiver reads each chunk straight into the pages (RoomPages.host_segments: byte views of
the runs of consecutive pages the chunk covers). With the pool on a GPU the chunk (one message: one or more
layers) lands in a pinned staging buffer and RoomPages.land_staged queues one host → device copy of it and
the copies into the pages, on a stream of the receiver's own so it never waits behind the engine's kernels.
Nothing waits for those copies on the way: the staging buffer goes back once its copies are done (an
event), and a room's end (RoomPages.flush) waits for the room's last copy, so no byte reaches its pages
after it ended and its KV is in place when the engine is told.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence

import torch

from tpla_serve.cache.pool import LatentKVPool


_DIRECT_RUNS = 8  # a chunk over at most this many runs of pages is copied run by run, else scattered by slot

StagedLayer = tuple[int, torch.dtype, int, int]
"""One wire layer of a staged chunk: (layer, dtype, ĉ width, k_pe width); its ĉ then k_pe rows follow the
previous layer's in the buffer."""


def _layer_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class KVPages:
    """One decode rank's pools as the KV stream writes them; room(pages) gives a room's destination."""

    def __init__(self, pool: LatentKVPool, draft_pool: LatentKVPool | None = None) -> None:
        self.pool = pool
        self.draft_pool = draft_pool
        self.device = pool.ckv[0].device
        self.on_host = self.device.type == "cpu"
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._copies: deque[tuple[torch.cuda.Event, Callable[[], None]]] = deque()  # in flight, in order
        self._copies_lock = threading.Lock()
        pools = [pool] if draft_pool is None else [pool, draft_pool]
        # Per wire layer: (ĉ bytes, k_pe bytes, ĉ row bytes, k_pe row bytes) of the whole layer.
        self._layers: list[tuple[memoryview, memoryview, int, int]] = []
        if self.on_host:
            for p in pools:
                isz = p.dtype.itemsize
                self._layers += [
                    (_layer_bytes(p.ckv[i]), _layer_bytes(p.kpe[i]), p.ckv_dim * isz, p.rope_dim * isz)
                    for i in range(p.num_layers)
                ]

    def room(self, pages: list[int]) -> RoomPages:
        return RoomPages(self, pages)

    def copy_queued(self, done: torch.cuda.Event, release: Callable[[], None]) -> None:
        """A chunk's copies are queued on the stream up to `done`: release its staging once they ran."""
        with self._copies_lock:
            self._copies.append((done, release))
        self.reap()

    def reap(self) -> None:
        """Give back the staging of every chunk whose copies have run (the stream runs them in order)."""
        while True:
            with self._copies_lock:
                if not self._copies or not self._copies[0][0].query():
                    return
                _, release = self._copies.popleft()
            release()


class RoomPages:
    """A room's destination: a KVWriter (writer(layer, token_start, ckv, kpe)) that also lands bytes in
    place. Wire layers past the target's are the draft's, in the draft pool's same pages."""

    def __init__(self, pages_of: KVPages, pages: list[int]) -> None:
        self._of = pages_of
        page_size = pages_of.pool.page_size
        self.page_size = page_size
        self.pages = pages
        self._slots: torch.Tensor | None = None
        self._last_copy: torch.cuda.Event | None = None

    @property
    def slots(self) -> torch.Tensor:
        if self._slots is None:
            ps = self.page_size
            slots = [p * ps + o for p in self.pages for o in range(ps)]
            self._slots = torch.tensor(slots, dtype=torch.int64, device=self._of.device)
        return self._slots

    def _target(self, layer: int) -> tuple[LatentKVPool, int]:
        pool = self._of.pool
        if layer >= pool.num_layers:
            assert self._of.draft_pool is not None, "draft KV reached a rank without a draft pool"
            return self._of.draft_pool, layer - pool.num_layers
        return pool, layer

    def host_segments(self, layers: Sequence[int], token_start: int, n: int) -> list[memoryview] | None:
        """Byte views of the pages tokens [token_start, token_start + n) of `layers` go to: per layer its ĉ,
        then its k_pe, each as runs of consecutive pages. None when the pool is not in host memory."""
        if not self._of.on_host:
            return None
        runs = self._runs(token_start, n)  # the same for every layer of the chunk
        segments = []
        for layer in layers:
            ckv, kpe, ckv_row, kpe_row = self._of._layers[layer]
            segments += [ckv[a * ckv_row : b * ckv_row] for a, b in runs]
            segments += [kpe[a * kpe_row : b * kpe_row] for a, b in runs]
        return segments

    def _runs(self, token_start: int, n: int) -> list[tuple[int, int]]:
        """Slot ranges [a, b) holding the tokens, consecutive pages merged."""
        ps, runs = self.page_size, []
        t, end = token_start, token_start + n
        while t < end:
            page, off = divmod(t, ps)
            a = self.pages[page] * ps + off
            b = a + min(ps - off, end - t)
            t += b - a
            while t < end and t % ps == 0 and self.pages[t // ps] * ps == b:
                step = min(ps, end - t)
                b += step
                t += step
            runs.append((a, b))
        return runs

    def land_staged(self, layers: Sequence[StagedLayer], token_start: int, n: int, staged: torch.Tensor,
                    release: Callable[[], None]) -> None:
        """Move a chunk landed in host memory (`staged`: per layer its ĉ then k_pe rows; the layers consecutive
        and of one pool, as a message carries them) into the pages and call `release` once `staged` is no
        longer read (GPU pools: host pools take bytes in place). One host → device copy of the whole chunk,
        then for all its layers at once a copy per run of consecutive pages (or one scatter by slot when the
        pages are scattered), queued on the receiver's stream; nothing waits for them here."""
        stream = self._of.stream
        assert stream is not None, "a pool in host memory takes its bytes in place (host_segments)"
        pool, first = self._target(layers[0][0])
        _, dtype, ckv_width, kpe_width = layers[0]
        count = len(layers)
        if self._target(layers[-1][0])[0] is not pool:  # the message's layers are consecutive (layer_landing)
            raise ValueError("a KV message's layers must be layers of one model, the target's or the draft's")
        runs = self._runs(token_start, n)
        if self._last_copy is None:
            # The room's first copies wait for what the engine queued before: kernels of the pages' last
            # owner may still read them.
            stream.wait_stream(torch.cuda.current_stream(self._of.device))
        try:
            with torch.cuda.stream(stream):
                loc = self.slots[token_start : token_start + n] if len(runs) > _DIRECT_RUNS else None
                rows = staged.to(self._of.device, non_blocking=True).view(dtype).view(count, -1)
                ckv = rows[:, : n * ckv_width].view(count, n, ckv_width)
                kpe = rows[:, n * ckv_width :].view(count, n, kpe_width)
                if dtype != pool.dtype:
                    ckv, kpe = ckv.to(pool.dtype), kpe.to(pool.dtype)
                dst_ckv = pool.ckv_layers[first : first + count].view(count, -1, pool.ckv_dim)
                dst_kpe = pool.kpe_layers[first : first + count].view(count, -1, pool.rope_dim)
                if loc is not None:
                    dst_ckv.index_copy_(1, loc, ckv)
                    dst_kpe.index_copy_(1, loc, kpe)
                else:
                    t = 0
                    for a, b in runs:
                        dst_ckv[:, a:b].copy_(ckv[:, t : t + b - a])
                        dst_kpe[:, a:b].copy_(kpe[:, t : t + b - a])
                        t += b - a
                done = torch.cuda.Event()
                done.record(stream)
        except BaseException:
            stream.synchronize()  # nothing queued may still read `staged` once the caller gives it back
            raise
        self._last_copy = done
        self._of.copy_queued(done, release)

    def flush(self) -> None:
        """Wait until every copy queued for this room has run (the room ends: its pages may be reused)."""
        if self._last_copy is not None:
            self._last_copy.synchronize()
            self._last_copy = None
            self._of.reap()

    def __call__(self, layer: int, token_start: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        pool, layer = self._target(layer)
        loc = self.slots[token_start : token_start + ckv.shape[0]]
        pool.write(layer, loc, ckv.to(loc.device), kpe.to(loc.device))
