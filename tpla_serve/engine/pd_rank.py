"""Each rank's part of prefill/decode disaggregation (the transport is tpla_serve.disagg).

Prefill: rank 0 streams every layer's new KV of the prompts that have a bootstrap room, right after the
layer writes it, so bytes move while the next layers compute. Decode: every rank receives its own slice
of the latent straight into its KV pages; rank 0 gathers the ranks' endpoints for REGISTER.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.disagg import DecodeLayout, KVReceiver, KVSender, KVSpec, RoomCompleted, RoomFailed, dtype_name
from tpla_serve.engine.forward_batch import BatchEntry

logger = logging.getLogger(__name__)
ENDPOINT_BYTES = 256


def kv_spec(pool: LatentKVPool, kv_lora_rank: int, fingerprint: str) -> KVSpec:
    return KVSpec(pool.num_layers, kv_lora_rank, pool.rope_dim, dtype_name(pool.dtype), fingerprint)


class LayerKVStreamer:
    """ForwardBatch.kv_sink on a prefill's rank 0: sends each room's rows of every layer as it is written."""

    def __init__(self, sender: KVSender, entries: list[BatchEntry]) -> None:
        self.sender = sender
        self.rows: list[tuple[int, int, int, int]] = []  # (room, first row, end row, token_start)
        row = 0
        for e in entries:
            if e.kv_room is not None:
                self.rows.append((e.kv_room, row, row + len(e.new_token_ids), e.prefix_len))
            row += len(e.new_token_ids)

    def on_layer(self, layer: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        for room, r0, r1, start in self.rows:
            self.sender.send_layer(room, layer, ckv[r0:r1].contiguous(), kpe[r0:r1].contiguous(), start)


def pages_writer(pool: LatentKVPool, pages: list[int]):  # type: ignore[no-untyped-def]
    """The KVWriter for one room: received token rows go to the room's own pages and nowhere else."""
    page_size = pool.page_size
    slots = torch.tensor(
        [p * page_size + o for p in pages for o in range(page_size)], dtype=torch.int64, device=pool.ckv[0].device
    )

    def write(layer: int, token_start: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        loc = slots[token_start : token_start + ckv.shape[0]]
        pool.write(layer, loc, ckv.to(loc.device), kpe.to(loc.device))

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
    ) -> None:
        self.pool = pool
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
        self.receiver.expect(room, n_tokens, pages_writer(self.pool, pages), host, port)

    def poll(self) -> list[RoomCompleted | RoomFailed]:
        events = self.receiver.poll()
        for ev in events:
            if isinstance(ev, RoomCompleted):
                self.completed[ev.room] = ev
            else:
                self.failed[ev.room] = ev.message
        return events

    def wait_complete(self, room: int) -> None:
        """Ranks > 0: block until this rank holds the room's KV (rank 0 saw its own slice arrive)."""
        deadline = time.monotonic() + self.timeout_s
        while room not in self.completed:
            self.poll()
            if room in self.failed:
                raise RuntimeError(f"room {room}: rank 0 has its KV but this rank failed: {self.failed.pop(room)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"room {room}: this rank's KV did not arrive within {self.timeout_s} s")
            time.sleep(0.001)
        del self.completed[room]

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
