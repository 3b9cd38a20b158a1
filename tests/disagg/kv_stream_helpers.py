"""Shared pieces of the KV-stream tests: small model specs, a paged writer, deterministic prompt KV."""

from __future__ import annotations

import queue
import random
import socket
import threading
import time
from collections.abc import Callable

import torch
import zmq

from tpla_serve.cache.pool import LatentKVPool, PageAllocator
from tpla_serve.disagg import DecodeLayout, KVReceiver, KVSender, KVSpec, LayerKV, RoomEvent, decode
from tpla_serve.disagg.auth import TAG_BYTES
from tpla_serve.disagg.pages import KVPages
from tpla_serve.disagg.tcp_stream import PREFIX, SIZE, envelope

NUM_LAYERS = 4
KV_LORA_RANK = 16
ROPE_DIM = 8
PAGE_SIZE = 4


def small_spec(**overrides: object) -> KVSpec:
    fields: dict = {
        "num_layers": NUM_LAYERS,
        "kv_lora_rank": KV_LORA_RANK,
        "rope_dim": ROPE_DIM,
        "dtype": "bfloat16",
        "fingerprint": "m1",
    }
    fields.update(overrides)
    return KVSpec(**fields)


def prompt_kv(room: int, n_tokens: int, spec: KVSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (ĉ [n, r], k_pe [n, d_r]), a function of the room only, so two processes agree."""
    gen = torch.Generator().manual_seed(room % (2**31))
    return [
        (
            torch.randn(n_tokens, spec.kv_lora_rank, generator=gen).to(spec.torch_dtype),
            torch.randn(n_tokens, spec.rope_dim, generator=gen).to(spec.torch_dtype),
        )
        for _ in range(spec.num_layers)
    ]


def expected_ckv_slice(ckv: torch.Tensor, tp_size: int, groups: int, rank: int) -> torch.Tensor:
    """Rank k of T with g groups keeps latent dims of group k // (T/g): written out by hand, as DESIGN §3."""
    width = ckv.shape[1] // groups
    group = rank // (tp_size // groups)
    return ckv[:, group * width : (group + 1) * width]


class PagedRank:
    """One decode rank's KV pool; writer() places received chunks into a room's pages like an engine."""

    def __init__(self, layout: DecodeLayout, num_pages: int = 64) -> None:
        kv = layout.kv
        self.pool = LatentKVPool(
            kv.num_layers, num_pages, layout.page_size, layout.ckv_width, kv.rope_dim, kv.torch_dtype, "cpu"
        )
        self.alloc = PageAllocator(num_pages)
        self.page_size = layout.page_size
        self.calls: list[tuple[int, int, int, float]] = []  # (layer, token_start, n, time)

    def reserve(self, n_tokens: int) -> torch.Tensor:
        pages = self.alloc.alloc(-(-n_tokens // self.page_size))
        assert pages is not None
        slots = torch.tensor([p * self.page_size + o for p in pages for o in range(self.page_size)])
        return slots[:n_tokens]

    def writer(self, slots: torch.Tensor) -> Callable[[int, int, torch.Tensor, torch.Tensor], None]:
        def write(layer: int, token_start: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
            n = ckv.shape[0]
            self.pool.write(layer, slots[token_start : token_start + n], ckv, kpe)
            self.calls.append((layer, token_start, n, time.monotonic()))

        return write


class InPlaceRank:
    """A decode rank receiving into its pools' pages in place (KVPages), as the engine does: a target pool
    (and a draft pool when the layout sends it draft KV) on `device`, pages handed out in a shuffled order,
    as a long-running server's allocator would."""

    def __init__(self, layout: DecodeLayout, rank: int, rng: random.Random, secret: str, device: str = "cpu",
                 num_pages: int = 48, **kwargs: object) -> None:
        kv, ps = layout.kv, layout.page_size
        self.layout, self.rank, self.device = layout, rank, device
        self.pool = LatentKVPool(kv.num_layers, num_pages, ps, layout.ckv_width, kv.rope_dim, kv.torch_dtype,
                                 device)
        self.draft_pool = None
        if layout.wants_draft(rank):
            d = layout.draft
            assert d is not None
            self.draft_pool = LatentKVPool(d.num_layers, num_pages, ps, d.kv_lora_rank, d.rope_dim,
                                           d.torch_dtype, device)
        self.pages = KVPages(self.pool, self.draft_pool)
        self.free = list(range(1, num_pages))
        rng.shuffle(self.free)
        self.rx = KVReceiver(layout, rank, secret=secret, **kwargs)
        self.slots: dict[int, torch.Tensor] = {}

    def expect(self, room: int, n: int, port: int) -> None:
        ps = self.layout.page_size
        pages = [self.free.pop() for _ in range(-(-n // ps))]
        slots = [p * ps + o for p in pages for o in range(ps)]
        self.slots[room] = torch.tensor(slots, device=self.device)[:n]
        self.rx.expect(room, n, self.pages.room(pages), "127.0.0.1", port)

    def assert_holds(self, room: int, kv: list, draft_kv: list | None) -> None:
        T, g = self.layout.tp_size, self.layout.latent_groups
        for layer, (ckv, kpe) in enumerate(kv):
            got_ckv, got_kpe = (t.cpu() for t in self.pool.read(layer, self.slots[room]))
            assert torch.equal(got_ckv, expected_ckv_slice(ckv, T, g, self.rank)), (self.rank, layer)
            assert torch.equal(got_kpe, kpe), (self.rank, layer)
        if self.draft_pool is not None and draft_kv is not None:
            for layer, (ckv, kpe) in enumerate(draft_kv):
                got_ckv, got_kpe = (t.cpu() for t in self.draft_pool.read(layer, self.slots[room]))
                assert torch.equal(got_ckv, ckv) and torch.equal(got_kpe, kpe), (self.rank, "draft", layer)

    def close(self) -> None:
        self.rx.close()


class Decode:
    """A decode server's transport: T receivers, each with its own paged KV pool."""

    def __init__(self, layout: DecodeLayout, **kwargs: object) -> None:
        self.layout = layout
        self.ranks = [PagedRank(layout) for _ in range(layout.tp_size)]
        self.rx = [KVReceiver(layout, r, **kwargs) for r in range(layout.tp_size)]
        self.slots: dict[int, torch.Tensor] = {}

    @property
    def endpoints(self) -> list[str]:
        return [r.endpoint for r in self.rx]

    def expect(self, room: int, n_tokens: int, port: int | None, register: bool = True) -> None:
        for rank, rx in zip(self.ranks, self.rx):
            slots = rank.reserve(n_tokens)
            rx.expect(room, n_tokens, rank.writer(slots), "127.0.0.1", port)
            self.slots[room] = slots
        if register:
            self.rx[0].send_register(room, self.endpoints)

    def events(self, timeout_s: float = 10.0) -> list[list]:
        return wait_events(self.rx, timeout_s)

    def assert_holds(self, room: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        T, g = self.layout.tp_size, self.layout.latent_groups
        for r, rank in enumerate(self.ranks):
            for layer, (ckv, kpe) in enumerate(kv):
                got_ckv, got_kpe = rank.pool.read(layer, self.slots[room])
                assert torch.equal(got_ckv, expected_ckv_slice(ckv, T, g, r)), (r, layer)
                assert torch.equal(got_kpe, kpe), (r, layer)

    def close(self) -> None:
        for rx in self.rx:
            rx.close()


def wait_events(
    receivers: list[KVReceiver], timeout_s: float = 10.0, per_rank: int = 1
) -> list[list[RoomEvent]]:
    """Poll every receiver until each has `per_rank` events (or the timeout)."""
    got: list[list[RoomEvent]] = [[] for _ in receivers]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(len(g) < per_rank for g in got):
        for i, r in enumerate(receivers):
            got[i] += r.poll()
        time.sleep(0.005)
    return got


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def poll_until(transport: KVSender | KVReceiver, timeout_s: float = 10.0) -> list[RoomEvent]:
    """The first non-empty poll() of a transport (empty after the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = transport.poll()
        if events:
            return events
        time.sleep(0.005)
    return transport.poll()


def owned_socket(closing: list, kind: int, linger_ms: int) -> zmq.Socket:
    """A raw socket on a context of its own (a misbehaving peer), closed with the test's `closing` list."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)

    class _Closer:
        def close(self) -> None:
            sock.close()
            ctx.term()

    closing.append(_Closer())
    return sock


class StreamPeer:
    """A raw peer on a decode rank's data endpoint: writes messages in the stream's own format (a
    misbehaving prefill), closed with the test's `closing` list."""

    def __init__(self, closing: list, endpoint: str) -> None:
        host, port = endpoint[len("tcp://") :].rsplit(":", 1)
        self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        closing.append(self)

    def send_multipart(self, frames: list) -> None:
        """One message; a header without its tag frame gets a zero tag."""
        frames = list(frames) if len(frames) >= 2 else [*frames, b"\0" * TAG_BYTES]
        self.sock.sendall(b"".join(bytes(b) for b in envelope(frames)))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed_by_peer(self, timeout_s: float = 5.0) -> bool:
        """Whether the decode rank closed this connection (reads until EOF or the timeout)."""
        self.sock.settimeout(timeout_s)
        try:
            while self.sock.recv(4096):
                pass
        except (TimeoutError, socket.timeout):
            return False
        except OSError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()


class LayerCounter:
    """A sink in front of a receiver that records how many layers each LAYER_KV carried."""

    def __init__(self, sink: object) -> None:
        self.sink, self.layers_per_message = sink, []

    def land(self, header: memoryview, tag: memoryview, sizes: list[int]) -> object:
        msg = decode([bytes(header), bytes(tag), *(b"" for _ in sizes)])
        if isinstance(msg, LayerKV):
            self.layers_per_message.append(msg.n_layers)
        return self.sink.land(header, tag, sizes)


class TcpEndpoint:
    """A fake decode rank's data endpoint on loopback: accepts every connection and hands it to
    on_connection (on the accepting thread)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.on_connection(conn)

    def on_connection(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.server.close()


class StreamTap(TcpEndpoint):
    """Records every message a prefill sends it, as frames, and which of its connections (in the order
    they were accepted) each came on."""

    def __init__(self, closing: list) -> None:
        self.messages: queue.Queue[list[bytes]] = queue.Queue()
        self.connection_of: list[tuple[int, list[bytes]]] = []  # (connection, frames) per message
        self.connections = 0
        super().__init__()
        closing.append(self)

    def on_connection(self, conn: socket.socket) -> None:
        self.connections += 1
        threading.Thread(target=self._read, args=(conn, self.connections - 1), daemon=True).start()

    def _read(self, conn: socket.socket, index: int) -> None:
        with conn, conn.makefile("rb") as f:
            while head := f.read(PREFIX.size):
                header_len, n = PREFIX.unpack(head)
                sizes = [SIZE.unpack(f.read(SIZE.size))[0] for _ in range(n)]
                frames = [f.read(header_len), f.read(TAG_BYTES), *(f.read(s) for s in sizes)]
                self.connection_of.append((index, frames))
                self.messages.put(frames)

    def recv_multipart(self, timeout_s: float = 5.0) -> list[bytes]:
        return self.messages.get(timeout=timeout_s)

    def poll(self, timeout_s: float) -> bool:
        """Whether a message has arrived (waiting up to timeout_s)."""
        return wait_until(lambda: not self.messages.empty(), timeout_s)
