"""The KV stream into real paged pools, as the engine receives it: chunks read in place into a room's pages
(scattered pages, page sizes 16 and 64, ragged prompts, chunks that cross pages, several lanes per rank,
draft KV along), over TCP and over the loopback plane; and rooms that end mid-stream giving back every
staging buffer on both sides while nothing more is written into their pages."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest
import torch
import zmq
from kv_stream_helpers import (
    InPlaceRank,
    LayerCounter,
    StreamPeer,
    StreamTap,
    TcpEndpoint,
    owned_socket,
    prompt_kv,
    small_spec,
    wait_events,
    wait_until,
)

from tpla_serve.disagg import (
    DecodeLayout,
    Done,
    KVReceiver,
    KVSender,
    KVSpec,
    LayerKV,
    Register,
    RoomCompleted,
    RoomFailed,
    decode,
    encode,
)
from tpla_serve.disagg.auth import ClusterAuth, register_stamp
from tpla_serve.disagg.loopback import LoopbackPlane
from tpla_serve.disagg.tcp_stream import envelope
from tpla_serve.disagg.wire import tensor_frame

SECRET = "the paged stream tests' secret"
TARGET = small_spec(num_layers=3, kv_lora_rank=32, rope_dim=8)
DRAFT = small_spec(num_layers=2, kv_lora_rank=16, rope_dim=8, fingerprint="draft-1")


def _ranks(closing: list, layout: DecodeLayout, seed: int, **kwargs: object) -> list[InPlaceRank]:
    rng = random.Random(seed)
    ranks = [InPlaceRank(layout, r, rng, SECRET, **kwargs) for r in range(layout.tp_size)]
    closing.extend(ranks)
    return ranks


def _stream(sender: KVSender, room: int, n: int, chunk: int, draft: bool) -> tuple[list, list | None]:
    """The prompt's KV in chunks of `chunk` tokens (chunked prefill), target then draft layers, then DONE."""
    kv = prompt_kv(room, n, TARGET)
    draft_kv = prompt_kv(room + 1, n, DRAFT) if draft else None
    for start in range(0, n, chunk):
        for layer, (ckv, kpe) in enumerate(kv):
            sender.send_layer(room, layer, ckv[start : start + chunk], kpe[start : start + chunk], start)
        for layer, (ckv, kpe) in enumerate(draft_kv or []):
            rows = slice(start, start + chunk)
            sender.send_layer(room, layer, ckv[rows], kpe[rows], start, draft=True)
    sender.send_done(room, 3)
    return kv, draft_kv


@pytest.mark.parametrize("plane", ["tcp", "loopback"])
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize(
    "tp, groups, lanes, draft_ranks",
    [(1, 1, 1, ()), (2, 2, 1, (0,)), (2, 1, 2, (0, 1)), (4, 2, 3, ())],
    ids=["T1", "T2g2-draft", "T2g1-2lanes-draft", "T4g2-3lanes"],
)
def test_ragged_prompts_land_byte_exact_in_every_ranks_pages(
    closing: list, plane: str, page_size: int, tp: int, groups: int, lanes: int, draft_ranks: tuple[int, ...]
) -> None:
    net = LoopbackPlane() if plane == "loopback" else None
    draft = DRAFT if draft_ranks else None
    layout = DecodeLayout(TARGET, tp, groups, page_size, draft=draft, draft_ranks=draft_ranks)
    # Frames of at most ~1.5 pages: chunks start and end inside pages and cross page boundaries.
    ranks = _ranks(closing, layout, seed=page_size + tp, lanes=lanes, data_plane=net,
                   max_frame_bytes=(3 * page_size // 2) * DRAFT.kv_lora_rank * DRAFT.itemsize)
    sender = KVSender(TARGET, draft=DRAFT, secret=SECRET, data_plane=net)
    closing.append(sender)
    rooms = {}
    for i, n in enumerate([1, page_size - 1, page_size + 1, 3 * page_size + 5]):
        room = 1000 * page_size + i
        for r in ranks:
            r.expect(room, n, sender.bootstrap_port)
        ranks[0].rx.send_register(room, [r.rx.endpoint for r in ranks])
        rooms[room] = _stream(sender, room, n, chunk=max(1, n // 2 + 1), draft=draft is not None)
    for rank, events in zip(ranks, wait_events([r.rx for r in ranks], per_rank=len(rooms))):
        assert sorted(e.room for e in events if isinstance(e, RoomCompleted)) == sorted(rooms), events
        for room, (kv, draft_kv) in rooms.items():
            rank.assert_holds(room, kv, draft_kv)
        assert rank.rx.stats().staging_bytes == 0  # in place: no staging on the way
        assert all(e.draft_kv == layout.wants_draft(rank.rank) for e in events)
    assert sender.stats().staging_bytes == 0
    if net is None:
        assert sender.stats().sockets_open == tp * lanes


class _Stalled(TcpEndpoint):
    """A decode rank's endpoint that accepts a connection and never reads it: the prefill's writes fill
    the socket buffers and block."""

    def __init__(self) -> None:
        self.conns: list[socket.socket] = []
        super().__init__()

    def on_connection(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.conns.append(conn)

    def close(self) -> None:
        super().close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("num_layers, n", [(8, 4096), (32, 1024)])  # a layer per message; 4 per message
def test_a_room_aborted_while_its_slices_wait_for_a_stalled_decode_frees_every_staging_buffer(
    closing: list, num_layers: int, n: int
) -> None:
    spec = KVSpec(num_layers=num_layers, kv_lora_rank=512, rope_dim=64, dtype="bfloat16", fingerprint="big")
    sender = KVSender(spec, secret=SECRET, timeout_s=1.0)
    stalled, fine = _Stalled(), _Stalled()
    closing += [sender, stalled, fine]
    layout = DecodeLayout(spec, 2, 2, 64)  # g = 2: every layer is sliced into staging per rank
    # A REGISTER as a decode server holding the secret sends it, naming the stalled endpoints.
    rx = KVReceiver(layout, 0, secret=SECRET, default_bootstrap_port=sender.bootstrap_port)
    closing.append(rx)
    room = 77
    rx.expect(room, n, lambda *a: None, "127.0.0.1", None)
    rx.send_register(room, [stalled.endpoint, fine.endpoint])
    assert wait_until(lambda: sender.stats().rooms_registered == 1, 5.0)
    kv = prompt_kv(room, n, spec)
    for layer, (ckv, kpe) in enumerate(kv):
        sender.send_layer(room, layer, ckv, kpe)
    assert wait_until(lambda: sender.stats().staging_bytes > 0, 5.0)
    sender.abort(room, "client went away")
    # Queued slices are dropped at once; the write blocked in the kernel ends with the send timeout.
    assert wait_until(lambda: sender.stats().staging_bytes == 0, 10.0)
    assert sender.stats().rooms_live == 0


def test_a_room_cancelled_mid_stream_gets_no_byte_more_and_frees_the_receivers_staging(closing: list) -> None:
    layout = DecodeLayout(TARGET, 1, 1, 16)
    written: list[int] = []
    gate, release = threading.Event(), threading.Event()

    def writer(layer: int, start: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        written.append(layer)
        if layer == 0:
            gate.set()
            release.wait(5.0)

    rx = KVReceiver(layout, 0, secret=SECRET, max_frame_bytes=1 << 20)
    sender = KVSender(TARGET, secret=SECRET)
    closing += [sender, rx]
    room, n = 5, 40
    rx.expect(room, n, writer, "127.0.0.1", sender.bootstrap_port)  # a plain writer: chunks come staged
    rx.send_register(room, [rx.endpoint])
    kv = prompt_kv(room, n, TARGET)
    sender.send_layer(room, 0, *kv[0])
    assert gate.wait(5.0)
    for layer in range(1, len(kv)):  # queued behind the chunk in the writer
        sender.send_layer(room, layer, *kv[layer])
    assert rx.stats().staging_bytes > 0  # layer 0's chunk, in the writer now
    cancelled = threading.Thread(target=rx.cancel, args=(room, "client went away"))
    cancelled.start()  # waits for the writer call in progress, then no byte more goes to the room
    release.set()
    cancelled.join(5.0)
    sender.send_done(room, 1)
    # Layers 1-2 were either staged behind layer 0 (freed by the cancel) or arrive after it (dropped unread);
    # DONE goes out only if the prefill has not seen the ABORT yet. Which one is a race; the outcome is not.
    assert wait_until(lambda: sender.stats().rooms_live == 0, 5.0)
    assert wait_until(lambda: rx.stats().staging_bytes == 0, 5.0)
    time.sleep(0.2)  # a window for any straggler to reach the writer, were the cancel leaky
    assert written == [0] and rx.stats().staging_bytes == 0 and rx.poll() == []


def test_a_connection_that_breaks_mid_payload_fails_the_room_and_frees_its_staging(closing: list) -> None:
    layout = DecodeLayout(TARGET, 1, 1, 16)
    rx = KVReceiver(layout, 0, secret=SECRET, default_bootstrap_port=9)
    closing.append(rx)
    room, n = 9, 16
    rx.expect(room, n, lambda *a: None, "127.0.0.1", None)
    ckv, kpe = prompt_kv(room, n, TARGET)[0]
    key = ClusterAuth(SECRET).room_keys(room).to_decode
    frames = encode(LayerKV(room, 0, 0, n, tensor_frame(ckv), tensor_frame(kpe)), key)
    peer = StreamPeer(closing, rx.endpoint)
    data = b"".join(bytes(b) for b in envelope(frames))
    peer.send_raw(data[: len(data) - 100])
    peer.close()
    ((event,),) = wait_events([rx])
    assert isinstance(event, RoomFailed) and "broke off" in event.message
    assert rx.stats().staging_bytes == 0


def test_small_layers_ready_together_travel_in_one_message_per_rank(closing: list) -> None:
    net = LoopbackPlane()
    layout = DecodeLayout(TARGET, 2, 2, 16, draft=DRAFT, draft_ranks=(1,))
    ranks = _ranks(closing, layout, seed=3, data_plane=net)
    taps = []
    for listener in net.listeners.values():
        listener.sink = LayerCounter(listener.sink)
        taps.append(listener.sink)
    sender = KVSender(TARGET, draft=DRAFT, secret=SECRET, data_plane=net)
    closing.append(sender)
    room, n = 12, 20
    kv, draft_kv = _stream(sender, room, n, chunk=n, draft=True)  # every layer waits for the REGISTER
    for r in ranks:
        r.expect(room, n, sender.bootstrap_port)
    ranks[0].rx.send_register(room, [r.rx.endpoint for r in ranks])
    for rank, (event,) in zip(ranks, wait_events([r.rx for r in ranks])):
        assert isinstance(event, RoomCompleted), event
        rank.assert_holds(room, kv, draft_kv)
    # Rank 0: the target's layers in one message; rank 1 also the draft's, in one message of their own.
    expected = [[TARGET.num_layers], [TARGET.num_layers, DRAFT.num_layers]]
    assert sorted(t.layers_per_message for t in taps) == sorted(expected)


def test_a_batched_layer_keeps_its_lane_for_the_rest_of_the_room(closing: list) -> None:
    """With several lanes per rank, a layer's chunks must share one connection, or a later chunk can
    overtake an earlier one and the decode fails the room. Layers batched onto one lane stay on it."""
    tap = StreamTap(closing)  # the decode rank's endpoint: which connection each message came on
    sender = KVSender(TARGET, secret=SECRET)
    closing.append(sender)
    room, n, half = 21, 8, 4
    kv = prompt_kv(room, n, TARGET)
    for layer, (ckv, kpe) in enumerate(kv):  # the first chunk of every layer waits for the REGISTER
        sender.send_layer(room, layer, ckv[:half], kpe[:half])
    stamp_ms, nonce = register_stamp()
    reg = Register(room, DecodeLayout(TARGET, 1, 1, 16), (tap.endpoint,), tap.endpoint, n, 1 << 20,
                   stamp_ms, nonce, lanes=3)
    push = owned_socket(closing, zmq.PUSH, 1000)
    push.connect(sender.bootstrap_endpoint)
    push.send_multipart(encode(reg, ClusterAuth(SECRET).register_key))
    assert wait_until(lambda: len(tap.connection_of) == 1)  # the first chunk: one message of all layers
    for layer, (ckv, kpe) in enumerate(kv):  # the second chunk layer by layer, each sent alone
        sender.send_layer(room, layer, ckv[half:], kpe[half:], half)
        assert wait_until(lambda: len(tap.connection_of) == layer + 2)
    sender.send_done(room, 3)
    assert wait_until(lambda: len(tap.connection_of) == TARGET.num_layers + 2)
    layers = [decode(frames) for _, frames in tap.connection_of[:-1]]
    assert [(m.layer, m.n_layers, m.token_start) for m in layers] == [(0, 3, 0), (0, 1, 4), (1, 1, 4), (2, 1, 4)]
    assert {connection for connection, _ in tap.connection_of} == {0}
    assert isinstance(decode(tap.connection_of[-1][1]), Done)


def test_a_done_with_more_frames_than_done_has_is_refused_before_its_payload_is_read(closing: list) -> None:
    layout = DecodeLayout(TARGET, 1, 1, 16)
    rx = KVReceiver(layout, 0, secret=SECRET, default_bootstrap_port=9, max_frame_bytes=1 << 16)
    closing.append(rx)
    room = 11
    rx.expect(room, 4, lambda *a: None, "127.0.0.1", None)
    header, tag = encode(Done(room, 1), ClusterAuth(SECRET).room_keys(room).to_decode)
    peer = StreamPeer(closing, rx.endpoint)
    peer.send_multipart([header, tag, *([b"\0" * (1 << 16)] * 6)])  # 6 frames of the largest size
    assert wait_until(lambda: rx.stats().messages_rejected == 1, 5.0)
    assert rx.stats().rooms_live == 1 and rx.stats().staging_bytes == 0 and rx.poll() == []
