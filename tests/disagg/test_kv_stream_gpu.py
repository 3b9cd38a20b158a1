"""The KV stream with device memory at both ends (run on a GPU machine): a prefill's CUDA layers staged to
pinned memory without waiting, decode ranks landing chunks in pinned staging and copying each to their
CUDA pages; byte-exact on every rank, with the draft's KV along, and every staging buffer given back."""

from __future__ import annotations

import random
import time

import pytest
from kv_stream_helpers import InPlaceRank, LayerCounter, prompt_kv, small_spec, wait_events, wait_until

from tpla_serve.disagg import DecodeLayout, KVSender, RoomCompleted, RoomFailed
from tpla_serve.disagg.loopback import LoopbackPlane

pytestmark = pytest.mark.gpu
SECRET = "the GPU stream tests' secret"
TARGET = small_spec(num_layers=4, kv_lora_rank=512, rope_dim=64)
DRAFT = small_spec(num_layers=2, kv_lora_rank=128, rope_dim=64, fingerprint="draft-1")


def _ranks(closing: list, layout: DecodeLayout, **kwargs: object) -> list[InPlaceRank]:
    """Device pools at both ends; chunks land in pinned staging, then one device copy each."""
    rng = random.Random(layout.tp_size)
    ranks = [InPlaceRank(layout, r, rng, SECRET, device="cuda", num_pages=96, pin_staging=True,
                         max_frame_bytes=1 << 16, **kwargs) for r in range(layout.tp_size)]
    closing.extend(ranks)
    return ranks


def _register(ranks: list[InPlaceRank], sender: KVSender, room: int, n: int) -> None:
    """Every rank expects the room; rank 0 registers it with the prefill, as a decode server does."""
    for r in ranks:
        r.expect(room, n, sender.bootstrap_port)
    ranks[0].rx.send_register(room, [r.rx.endpoint for r in ranks])


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("tp, groups, draft_ranks", [(1, 1, (0,)), (2, 2, (0,)), (2, 1, (0, 1))])
def test_device_kv_lands_byte_exact_on_every_rank(
    closing: list, page_size: int, tp: int, groups: int, draft_ranks: tuple[int, ...]
) -> None:
    layout = DecodeLayout(TARGET, tp, groups, page_size, draft=DRAFT, draft_ranks=draft_ranks)
    ranks = _ranks(closing, layout)
    sender = KVSender(TARGET, draft=DRAFT, secret=SECRET)
    closing.append(sender)
    rooms = {}
    for i, n in enumerate([1, page_size + 3, 5 * page_size - 1, 700]):
        room = 100 * page_size + i
        kv, draft_kv = prompt_kv(room, n, TARGET), prompt_kv(room + 1, n, DRAFT)
        _register(ranks, sender, room, n)
        half = n // 2 + 1
        for start, end in ((0, half), (half, n)):  # chunked prefill: two chunks per layer
            if start >= end:
                continue
            for layer, (ckv, kpe) in enumerate(kv):
                sender.send_layer(room, layer, ckv[start:end].cuda(), kpe[start:end].cuda(), start)
            for layer, (ckv, kpe) in enumerate(draft_kv):
                sender.send_layer(room, layer, ckv[start:end].cuda(), kpe[start:end].cuda(), start,
                                  draft=True)
        sender.send_done(room, 1)
        rooms[room] = (kv, draft_kv)
    for rank, events in zip(ranks, wait_events([r.rx for r in ranks], timeout_s=30.0, per_rank=len(rooms))):
        assert all(isinstance(e, RoomCompleted) for e in events) and len(events) == len(rooms), events
        for room, (kv, draft_kv) in rooms.items():
            rank.assert_holds(room, kv, draft_kv)
        assert rank.rx.stats().staging_bytes == 0
    assert wait_until(lambda: sender.stats().staging_bytes == 0, 5.0)


def test_an_aborted_device_room_gives_back_every_pinned_buffer(closing: list) -> None:
    layout = DecodeLayout(TARGET, 2, 2, 64)
    ranks = _ranks(closing, layout)
    sender = KVSender(TARGET, secret=SECRET)
    closing.append(sender)
    room, n = 7, 2048
    kv = prompt_kv(room, n, TARGET)
    _register(ranks, sender, room, n)
    for layer, (ckv, kpe) in enumerate(kv[:2]):
        sender.send_layer(room, layer, ckv.cuda(), kpe.cuda())
    sender.abort(room, "the prefill request ended")
    for (event,) in wait_events([r.rx for r in ranks], timeout_s=30.0):
        assert isinstance(event, RoomFailed) and "the prefill request ended" in event.message
    assert wait_until(lambda: sender.stats().staging_bytes == 0, 10.0)
    assert all(wait_until(lambda r=r: r.rx.stats().staging_bytes == 0, 10.0) for r in ranks)


def test_small_device_layers_handed_over_one_by_one_travel_in_one_message_per_rank(closing: list) -> None:
    """The engine computes between layers, so a GPU's layers reach the sender one at a time; small ones
    wait in staging for more (a decode rank on a GPU pays a device copy per message) and go with DONE."""
    net = LoopbackPlane()
    layout = DecodeLayout(TARGET, 2, 2, 16)
    ranks = _ranks(closing, layout, data_plane=net)
    taps = []
    for listener in net.listeners.values():
        listener.sink = LayerCounter(listener.sink)
        taps.append(listener.sink)
    sender = KVSender(TARGET, secret=SECRET, data_plane=net)
    closing.append(sender)
    room, n = 9, 40
    kv = prompt_kv(room, n, TARGET)
    _register(ranks, sender, room, n)
    assert wait_until(lambda: sender.stats().rooms_registered == 1)
    for layer, (ckv, kpe) in enumerate(kv):
        sender.send_layer(room, layer, ckv.cuda(), kpe.cuda())
        time.sleep(0.02)  # the IO thread handles each layer alone, with nothing queued behind it
    sender.send_done(room, 1)
    for rank, (event,) in zip(ranks, wait_events([r.rx for r in ranks], timeout_s=30.0)):
        assert isinstance(event, RoomCompleted), event
        rank.assert_holds(room, kv, None)
    assert [t.layers_per_message for t in taps] == [[TARGET.num_layers]] * layout.tp_size


@pytest.mark.parametrize("registered_first", [True, False])
def test_device_layers_land_byte_exact_whether_or_not_the_room_registered_first(
    closing: list, registered_first: bool
) -> None:
    """A registered room's device layers reach the IO thread still on the device and are staged a batch at
    a time (one gather, cut by latent group, and one device → host copy); a room's layers that come before
    its REGISTER are staged at once, whole, and cut per rank on the host. Both land byte-exact."""
    layout = DecodeLayout(TARGET, 2, 2, 16, draft=DRAFT, draft_ranks=(0,))
    ranks = _ranks(closing, layout)
    sender = KVSender(TARGET, draft=DRAFT, secret=SECRET)
    closing.append(sender)
    room, n = 11, 300
    kv, draft_kv = prompt_kv(room, n, TARGET), prompt_kv(room + 1, n, DRAFT)
    if registered_first:
        _register(ranks, sender, room, n)
        assert wait_until(lambda: sender.stats().rooms_registered == 1)
    for layer, (ckv, kpe) in enumerate(kv):
        sender.send_layer(room, layer, ckv.cuda(), kpe.cuda())
    for layer, (ckv, kpe) in enumerate(draft_kv):
        sender.send_layer(room, layer, ckv.cuda(), kpe.cuda(), draft=True)
    if not registered_first:
        time.sleep(0.2)  # every layer waits in the sender's buffer before the REGISTER
        _register(ranks, sender, room, n)
    sender.send_done(room, 1)
    for rank, (event,) in zip(ranks, wait_events([r.rx for r in ranks], timeout_s=30.0)):
        assert isinstance(event, RoomCompleted), event
        rank.assert_holds(room, kv, draft_kv)
    assert wait_until(lambda: sender.stats().staging_bytes == 0, 5.0)
