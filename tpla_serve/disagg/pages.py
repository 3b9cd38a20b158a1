"""Where a decode rank's received KV goes: a room's own pages of the rank's pool (and its draft pool).

On the CPU the receiver reads each chunk straight into the pages (RoomPages.host_segments: byte views of
the runs of consecutive pages the chunk covers). With the pool on a GPU the chunk lands in a pinned
staging buffer and one host → device copy per chunk moves it (RoomPages.write_staged), on a stream of the
receiver's own so it never waits behind the engine's kernels.
"""

from __future__ import annotations

import torch

from tpla_serve.cache.pool import LatentKVPool


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


class RoomPages:
    """A room's destination: a KVWriter (writer(layer, token_start, ckv, kpe)) that also lands bytes in
    place. Wire layers past the target's are the draft's, in the draft pool's same pages."""

    def __init__(self, pages_of: KVPages, pages: list[int]) -> None:
        self._of = pages_of
        page_size = pages_of.pool.page_size
        self.page_size = page_size
        self.pages = pages
        self._slots: torch.Tensor | None = None

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

    def host_segments(self, layer: int, token_start: int, n: int) -> list[memoryview] | None:
        """Byte views of the pages tokens [token_start, token_start + n) of `layer` go to: ĉ, then k_pe,
        each as runs of consecutive pages. None when the pool is not in host memory."""
        if not self._of.on_host:
            return None
        ckv, kpe, ckv_row, kpe_row = self._of._layers[layer]
        runs = self._runs(token_start, n)
        return [ckv[a * ckv_row : b * ckv_row] for a, b in runs] + [
            kpe[a * kpe_row : b * kpe_row] for a, b in runs
        ]

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

    def write_staged(self, layer: int, token_start: int, ckv: torch.Tensor, kpe: torch.Tensor,
                     staged: torch.Tensor) -> None:
        """Copy a chunk landed in host memory (`staged`: its bytes, ĉ then k_pe) into the pages: on a GPU
        one device copy of the whole chunk, then the scatter into pages, on the receiver's stream."""
        pool, layer = self._target(layer)
        loc = self.slots[token_start : token_start + ckv.shape[0]]
        stream = self._of.stream
        if stream is None:
            pool.write(layer, loc, ckv, kpe)
            return
        stream.wait_stream(torch.cuda.current_stream(loc.device))  # the slots were made on that stream
        with torch.cuda.stream(stream):
            dev = staged.to(loc.device, non_blocking=True)
            split = ckv.nbytes
            pool.write(layer, loc, dev[:split].view(ckv.dtype).view(ckv.shape),
                       dev[split:].view(kpe.dtype).view(kpe.shape))
        stream.synchronize()  # the staging buffer is reused once this returns

    def __call__(self, layer: int, token_start: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        pool, layer = self._target(layer)
        loc = self.slots[token_start : token_start + ckv.shape[0]]
        pool.write(layer, loc, ckv.to(loc.device), kpe.to(loc.device))
