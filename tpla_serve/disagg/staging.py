"""Reusable host buffers for the KV stream: what the sender slices layers into and what a decode rank
lands chunks in before one device copy (pinned when the KV lives on a GPU, so copies run at full speed).

Fresh multi-megabyte host allocations cost page faults on every use; a stream that moves gigabytes per
prompt keeps its buffers instead. Buffers come in power-of-two size classes; what is returned is kept up to
`max_cached_bytes`, the rest is freed. `in_use` counts bytes handed out and not yet returned, so a room
that ends mid-stream can be checked to have given back every buffer.
"""

from __future__ import annotations

import threading

import torch

_MIN_CLASS = 1 << 12


class StagingPool:
    """Thread-safe free lists of uint8 host tensors (pinned when `pin`)."""

    def __init__(self, pin: bool = False, max_cached_bytes: int = 256 << 20) -> None:
        self.pin = pin
        self.max_cached_bytes = max_cached_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self._cached = 0
        self._in_use = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Bytes of buffers handed out and not yet released."""
        return self._in_use

    @property
    def cached(self) -> int:
        return self._cached

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of exactly `nbytes` (a view of a buffer of its size class)."""
        size = max(_MIN_CLASS, 1 << max(0, nbytes - 1).bit_length())
        with self._lock:
            free = self._free.get(size)
            buf = free.pop() if free else None
            if buf is not None:
                self._cached -= size
            self._in_use += size
        if buf is None:
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        return buf[:nbytes]

    def release(self, buf: torch.Tensor) -> None:
        """Give back a buffer from acquire(); it must not be used afterwards."""
        base = buf._base if buf._base is not None else buf
        size = base.numel()
        with self._lock:
            self._in_use -= size
            if self._cached + size <= self.max_cached_bytes:
                self._free.setdefault(size, []).append(base)
                self._cached += size

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._cached = 0


def stage_device_layers(
    pool: StagingPool,
    ckvs: list[torch.Tensor],
    kpes: list[torch.Tensor],
    latent_groups: int,
    stream: torch.cuda.Stream | None = None,
    after: tuple[torch.cuda.Event, ...] = (),
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.cuda.Event, Holds]:
    """Copy device layers (ĉ [n, r] and k_pe [n, d_r] each, all of one shape) into one pinned buffer without
    waiting: each layer's ĉ as [g, n, r/g] when latent_groups > 1 (each latent group's slice contiguous).
    Several layers are gathered on the device first, so the batch costs one device→host copy, not one per
    layer. On `stream` (the current one when None) once the events `after` have completed; the inputs are
    marked as used by it, so their memory is not reused before the copies ran. Returns the layers' host
    tensors, the event that says the copies are complete, and the buffer's hold."""
    count, (n, r), dr = len(ckvs), ckvs[0].shape, kpes[0].shape[1]
    ckv_bytes, kpe_bytes = count * ckvs[0].nbytes, count * kpes[0].nbytes
    buf = pool.acquire(ckv_bytes + kpe_bytes)
    width = r // latent_groups
    host_ckv = buf[:ckv_bytes].view(ckvs[0].dtype).view(count, latent_groups, n, width)
    host_kpe = buf[ckv_bytes:].view(kpes[0].dtype).view(count, n, dr)
    side_stream = stream is not None
    stream = stream if stream is not None else torch.cuda.current_stream(ckvs[0].device)
    with torch.cuda.stream(stream):
        for event in after:
            stream.wait_event(event)
        if count == 1:
            host_ckv[0].copy_(ckvs[0].view(n, latent_groups, width).transpose(0, 1), non_blocking=True)
            host_kpe[0].copy_(kpes[0], non_blocking=True)
        else:
            gathered = torch.empty(ckv_bytes + kpe_bytes, dtype=torch.uint8, device=ckvs[0].device)
            dev_ckv = gathered[:ckv_bytes].view(ckvs[0].dtype).view(count, latent_groups, n, width)
            if latent_groups == 1:
                torch.stack(ckvs, out=dev_ckv.view(count, n, r))
            else:
                dev_ckv.copy_(torch.stack(ckvs).view(count, n, latent_groups, width).transpose(1, 2))
            torch.stack(kpes, out=gathered[ckv_bytes:].view(kpes[0].dtype).view(count, n, dr))
            buf.copy_(gathered, non_blocking=True)
        ready = torch.cuda.Event(blocking=True)  # who waits for it sleeps rather than spins
        ready.record(stream)
    if side_stream:
        for t in (*ckvs, *kpes):
            t.record_stream(stream)
    ckv_layers = list(host_ckv) if latent_groups > 1 else [c[0] for c in host_ckv]
    return ckv_layers, list(host_kpe), ready, Holds(pool, [buf])


class Holds:
    """Staging buffers shared by the messages that read them: back to the pool when the last lets go.
    Whoever makes it holds it once; hold() for each message queued, drop() when each is done."""

    def __init__(self, pool: StagingPool, buffers: list[torch.Tensor]) -> None:
        self._pool, self._buffers, self._count = pool, buffers, 1
        self._lock = threading.Lock()

    def hold(self) -> Holds:
        with self._lock:
            self._count += 1
        return self

    def drop(self) -> None:
        with self._lock:
            self._count -= 1
            last = self._count == 0
        if last:
            for buf in self._buffers:
                self._pool.release(buf)
            self._buffers = []
