"""Each rank's part of prefill/decode disaggregation (the transport is tpla_serve.disagg).

Prefill: rank 0 streams every layer's new KV of the prompts that have a bootstrap room, right after the
layer writes it, so bytes move while the next layers compute; with a draft model, the draft's layers
follow. Decode: every rank receives its own slice of the latent straight into its KV pages (and, on the
ranks that keep a draft, the draft's whole latent into the draft pool's same pages); rank 0 gathers the
ranks' endpoints for REGISTER.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.disagg import (
    DecodeLayout,
    KVReceiver,
    KVSender,
    KVSpec,
    KVWriter,
    RoomCompleted,
    RoomFailed,
    dtype_name,
)
from tpla_serve.forward_batch import BatchEntry

logger = logging.getLogger(__name__)
ENDPOINT_BYTES = 256


def kv_spec(pool: LatentKVPool, kv_lora_rank: int, fingerprint: str) -> KVSpec:
    return KVSpec(pool.num_layers, kv_lora_rank, pool.rope_dim, dtype_name(pool.dtype), fingerprint)


class LayerKVStreamer:
    """ForwardBatch.kv_sink on a prefill's rank 0: sends each room's rows of every layer as it is written
    (draft: the layers are the draft model's)."""

    def __init__(self, sender: KVSender, entries: list[BatchEntry], draft: bool = False) -> None:
        self.sender = sender
        self.draft = draft
        self.rows: list[tuple[int, int, int, int]] = []  # (room, first row, end row, token_start)
        row = 0
        for e in entries:
            if e.kv_room is not None:
                self.rows.append((e.kv_room, row, row + len(e.new_token_ids), e.prefix_len))
            row += len(e.new_token_ids)

    def on_layer(self, layer: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        for room, r0, r1, start in self.rows:
            self.sender.send_layer(
                room, layer, ckv[r0:r1].contiguous(), kpe[r0:r1].contiguous(), start, draft=self.draft
            )


def pages_writer(pool: LatentKVPool, pages: list[int], draft_pool: LatentKVPool | None = None) -> KVWriter:
    """The KVWriter for one room: received token rows go to the room's own pages and nowhere else.

    Wire layers past the target's are the draft's, written into the same pages of draft_pool (one page
    table indexes both pools); the receiver never passes them to a rank without a draft pool.
    """
    page_size = pool.page_size
    slots = torch.tensor(
        [p * page_size + o for p in pages for o in range(page_size)], dtype=torch.int64, device=pool.ckv[0].device
    )
    num_layers = pool.num_layers

    def write(layer: int, token_start: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        loc = slots[token_start : token_start + ckv.shape[0]]
        target = pool
        if layer >= num_layers:
            assert draft_pool is not None
            target, layer = draft_pool, layer - num_layers
        target.write(layer, loc, ckv.to(loc.device), kpe.to(loc.device))

    return write


class DecodeKVPort:
    """One decode rank's KV receiver and the rooms it has seen finish."""

    def __init__(
        self,
        layout: DecodeLayout,
        rank: int,
        pool: LatentKVPool,
        host: str,
        timeout_s: float,
        default_bootstrap_port: int,
        draft_pool: LatentKVPool | None = None,
    ) -> None:
        if layout.wants_draft(rank) != (draft_pool is not None):
            raise ValueError(f"rank {rank}: a draft pool must be given exactly when the layout sends it draft KV")
        self.pool = pool
        self.draft_pool = draft_pool
        self.timeout_s = timeout_s
        self.receiver = KVReceiver(
            layout, rank, host=host, timeout_s=timeout_s, default_bootstrap_port=default_bootstrap_port
        )
        self.completed: dict[int, RoomCompleted] = {}
        self.failed: dict[int, str] = {}

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    def expect(self, room: int, n_tokens: int, pages: list[int], host: str, port: int | None) -> None:
        self.receiver.expect(room, n_tokens, pages_writer(self.pool, pages, self.draft_pool), host, port)

    def poll(self) -> list[RoomCompleted | RoomFailed]:
        events = self.receiver.poll()
        for ev in events:
            if isinstance(ev, RoomCompleted):
                self.completed[ev.room] = ev
            else:
                self.failed[ev.room] = ev.message
        return events

    def wait_complete(self, room: int) -> RoomCompleted:
        """Ranks > 0: block until this rank holds the room's KV (rank 0 saw its own slice arrive)."""
        deadline = time.monotonic() + self.timeout_s
        while room not in self.completed:
            self.poll()
            if room in self.failed:
                raise RuntimeError(f"room {room}: rank 0 has its KV but this rank failed: {self.failed.pop(room)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"room {room}: this rank's KV did not arrive within {self.timeout_s} s")
            time.sleep(0.001)
        return self.completed.pop(room)

    def has_draft(self, event: RoomCompleted) -> bool:
        """Whether this rank's draft KV for the room is in place (trivially, when it keeps no draft)."""
        return self.draft_pool is None or event.draft_kv

    def forget(self, room: int) -> None:
        self.completed.pop(room, None)
        self.failed.pop(room, None)

    def close(self) -> None:
        self.receiver.close()


def gather_endpoints(endpoint: str, group: dist.ProcessGroup | None, world: int) -> list[str]:
    """Every rank's endpoint string, in rank order, through a fixed-size byte all-gather (no pickle)."""
    if world == 1:
        return [endpoint]
    data = endpoint.encode()
    if len(data) > ENDPOINT_BYTES:
        raise ValueError(f"endpoint {endpoint!r} is longer than {ENDPOINT_BYTES} bytes")
    mine = torch.zeros(ENDPOINT_BYTES, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [bytes(p.numpy().tobytes()).rstrip(b"\0").decode() for p in parts]
