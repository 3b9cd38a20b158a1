"""Draft-model KV on the prefill → decode stream (speculative decode servers), over loopback ZMQ.

The draft's layers follow the target's on the wire (layer kv.num_layers + i), whole, to the decode ranks
in layout.draft_ranks only; DONE says whether they came. A prefill that cannot serve the draft the decode
asks for still serves the room, without draft KV.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import pytest
import torch
import zmq
from kv_stream_helpers import (
    PAGE_SIZE,
    StreamPeer,
    expected_ckv_slice,
    owned_socket,
    prompt_kv,
    small_spec,
    wait_events,
    wait_until,
)

from tpla_serve.cache.pool import LatentKVPool, PageAllocator
from tpla_serve.disagg import (
    PROTOCOL_VERSION,
    DecodeLayout,
    KVReceiver,
    KVSender,
    KVSpec,
    Register,
    RoomCompleted,
    RoomFailed,
    decode,
    encode,
)
from tpla_serve.disagg.auth import ClusterAuth, register_stamp
from tpla_serve.disagg.pages import KVPages
from tpla_serve.disagg.messages import Done, LayerKV, tensor_frame

TARGET = small_spec()
DRAFT = small_spec(num_layers=2, kv_lora_rank=24, fingerprint="draft-1")
SECRET = "the draft tests' cluster secret"
AUTH = ClusterAuth(SECRET)


class Rank:
    """One decode rank: a target pool slice and, when the layout sends it draft KV, a whole draft pool
    addressed by the same pages (the engine's RoomPages places the rows, here through its copying path)."""

    def __init__(self, layout: DecodeLayout, rank: int, num_pages: int = 32) -> None:
        kv = layout.kv
        self.pool = LatentKVPool(
            kv.num_layers, num_pages, PAGE_SIZE, layout.ckv_width, kv.rope_dim, kv.torch_dtype, "cpu"
        )
        self.draft_pool = None
        if layout.wants_draft(rank):
            assert layout.draft is not None
            d = layout.draft
            self.draft_pool = LatentKVPool(
                d.num_layers, num_pages, PAGE_SIZE, d.kv_lora_rank, d.rope_dim, d.torch_dtype, "cpu"
            )
        self.alloc = PageAllocator(num_pages)
        self.rx = KVReceiver(layout, rank, secret=SECRET)
        self.layers_written: list[int] = []

    def expect(self, room: int, n: int, port: int) -> torch.Tensor:
        pages = self.alloc.alloc(-(-n // PAGE_SIZE))
        assert pages is not None
        write = KVPages(self.pool, self.draft_pool).room(pages)

        def record(layer: int, start: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
            self.layers_written.append(layer)
            write(layer, start, ckv, kpe)

        self.rx.expect(room, n, record, "127.0.0.1", port)
        return torch.tensor([p * PAGE_SIZE + o for p in pages for o in range(PAGE_SIZE)])[:n]

    def close(self) -> None:
        self.rx.close()


@pytest.fixture
def closing() -> Iterator[list]:
    objs: list = []
    yield objs
    for obj in objs:
        obj.close()


def _layout(tp: int, groups: int, draft: KVSpec | None, draft_ranks: tuple[int, ...]) -> DecodeLayout:
    return DecodeLayout(TARGET, tp, groups, PAGE_SIZE, draft=draft, draft_ranks=draft_ranks)


def _ranks(closing: list, layout: DecodeLayout) -> list[Rank]:
    ranks = [Rank(layout, r) for r in range(layout.tp_size)]
    closing.extend(ranks)
    return ranks


def _expect_all(ranks: list[Rank], room: int, n: int, port: int) -> list[torch.Tensor]:
    slots = [r.expect(room, n, port) for r in ranks]
    ranks[0].rx.send_register(room, [r.rx.endpoint for r in ranks])
    return slots


def _send(sender: KVSender, room: int, kv: list, draft_kv: list | None, split: int | None = None) -> None:
    """Target then draft layers, in two chunks when `split` is given (chunked prefill), then DONE."""
    chunks = [(0, None)] if split is None else [(0, split), (split, None)]
    for start, end in chunks:
        for layer, (ckv, kpe) in enumerate(kv):
            sender.send_layer(room, layer, ckv[start:end], kpe[start:end], start)
        for layer, (ckv, kpe) in enumerate(draft_kv or []):
            sender.send_layer(room, layer, ckv[start:end], kpe[start:end], start, draft=True)
    sender.send_done(room, 7)


@pytest.mark.parametrize(
    "tp, groups, draft_ranks, register_first",
    [(2, 2, (0,), True), (2, 2, (0, 1), False), (2, 1, (0, 1), True), (1, 1, (0,), False)],
    ids=["standard-T2g2", "easyspec-T2g2-layers-first", "easyspec-T2g1", "T1-layers-first"],
)
def test_draft_kv_reaches_exactly_the_draft_ranks(
    closing: list, tp: int, groups: int, draft_ranks: tuple[int, ...], register_first: bool
) -> None:
    sender = KVSender(TARGET, draft=DRAFT, max_rooms=8, secret=SECRET)
    closing.append(sender)
    layout = _layout(tp, groups, DRAFT, draft_ranks)
    ranks = _ranks(closing, layout)
    room, n = 2**40 + 3, 13
    kv, draft_kv = prompt_kv(room, n, TARGET), prompt_kv(room + 1, n, DRAFT)
    if register_first:
        slots = _expect_all(ranks, room, n, sender.bootstrap_port)
        assert wait_until(lambda: sender.stats().rooms_registered == 1, 5.0)
        _send(sender, room, kv, draft_kv, split=6)
    else:
        _send(sender, room, kv, draft_kv, split=6)
        slots = _expect_all(ranks, room, n, sender.bootstrap_port)
    events = wait_events([r.rx for r in ranks])
    target_bytes = n * TARGET.num_layers * (TARGET.kv_lora_rank // groups + TARGET.rope_dim) * 2
    draft_bytes = n * DRAFT.num_layers * (DRAFT.kv_lora_rank + DRAFT.rope_dim) * 2
    for r, (rank, rank_events) in enumerate(zip(ranks, events)):
        (event,) = rank_events
        wants = r in draft_ranks
        assert isinstance(event, RoomCompleted) and event.draft_kv is wants, event
        assert event.draft_nbytes == (draft_bytes if wants else 0)
        assert event.nbytes == target_bytes + event.draft_nbytes
        for layer, (ckv, kpe) in enumerate(kv):
            got_ckv, got_kpe = rank.pool.read(layer, slots[r])
            assert torch.equal(got_ckv, expected_ckv_slice(ckv, tp, groups, r)) and torch.equal(got_kpe, kpe)
        if wants:
            assert rank.draft_pool is not None
            for layer, (ckv, kpe) in enumerate(draft_kv):
                got_ckv, got_kpe = rank.draft_pool.read(layer, slots[r])
                assert torch.equal(got_ckv, ckv) and torch.equal(got_kpe, kpe)
        else:  # never offered a draft layer: nothing rejected, nothing past the target's layers written
            assert rank.draft_pool is None and max(rank.layers_written) < TARGET.num_layers
        stats = rank.rx.stats()
        assert stats.messages_rejected == 0 and stats.draft_bytes_received == event.draft_nbytes
    s = sender.stats()
    assert s.draft_bytes_sent == draft_bytes * len(draft_ranks) and s.rooms_live == 0
    assert s.bytes_sent == target_bytes * tp + s.draft_bytes_sent


@pytest.mark.parametrize(
    "prefill_draft, why",
    [(None, "no draft"), (small_spec(num_layers=2, kv_lora_rank=24, fingerprint="draft-2"), "fingerprint"),
     (small_spec(num_layers=3, kv_lora_rank=24, fingerprint="draft-1"), "num_layers")],
    ids=["prefill-without-draft", "other-draft", "other-draft-shape"],
)
def test_prefill_that_cannot_serve_the_draft_still_serves_the_room(
    closing: list, caplog: pytest.LogCaptureFixture, prefill_draft: KVSpec | None, why: str
) -> None:
    sender = KVSender(TARGET, draft=prefill_draft, secret=SECRET)
    closing.append(sender)
    ranks = _ranks(closing, _layout(2, 2, DRAFT, (0, 1)))
    for i in range(2):  # warned about once per decode server, not per room
        room, n = 50 + i, 5
        kv = prompt_kv(room, n, TARGET)
        slots = _expect_all(ranks, room, n, sender.bootstrap_port)
        draft_kv = prompt_kv(room, n, prefill_draft) if prefill_draft is not None else None
        _send(sender, room, kv, draft_kv)
        for r, ((event,), rank) in enumerate(zip(wait_events([r.rx for r in ranks]), ranks)):
            assert isinstance(event, RoomCompleted) and not event.draft_kv and event.draft_nbytes == 0, event
            assert torch.equal(rank.pool.read(0, slots[r])[1], kv[0][1])
            assert max(rank.layers_written) < TARGET.num_layers
            assert not rank.draft_pool.ckv[0].any()  # the draft pool is left alone
    assert sender.stats().draft_bytes_sent == 0
    warnings = [r for r in caplog.records if "prefill their draft locally" in r.getMessage()]
    assert len(warnings) == 1 and why in warnings[0].getMessage()


def test_target_mismatch_still_fails_with_a_draft(closing: list) -> None:
    sender = KVSender(small_spec(fingerprint="other"), draft=DRAFT, secret=SECRET)
    closing.append(sender)
    ranks = _ranks(closing, _layout(2, 2, DRAFT, (0,)))
    _expect_all(ranks, 9, 4, sender.bootstrap_port)
    for (event,) in wait_events([r.rx for r in ranks]):
        assert isinstance(event, RoomFailed) and "model fingerprint mismatch" in event.message


def test_draft_layers_the_engine_never_sent_fail_the_room(closing: list) -> None:
    """A prefill with a draft must send every draft layer before DONE, as it must every target layer."""
    sender = KVSender(TARGET, draft=DRAFT, secret=SECRET)
    closing.append(sender)
    ranks = _ranks(closing, _layout(1, 1, DRAFT, (0,)))
    room, n = 11, 4
    _expect_all(ranks, room, n, sender.bootstrap_port)
    _send(sender, room, prompt_kv(room, n, TARGET), prompt_kv(room, n, DRAFT)[:1])
    ((event,),) = wait_events([ranks[0].rx])
    assert isinstance(event, RoomFailed) and f"layer {TARGET.num_layers + 1}" in event.message


def test_sender_api_checks_draft_layers(closing: list) -> None:
    plain, with_draft = KVSender(TARGET, secret=SECRET), KVSender(TARGET, draft=DRAFT, secret=SECRET)
    closing += [plain, with_draft]
    ckv, kpe = prompt_kv(1, 2, DRAFT)[0]
    with pytest.raises(ValueError, match="without a draft"):
        plain.send_layer(1, 0, ckv, kpe, draft=True)
    with pytest.raises(ValueError, match="layer must be an int in \\[0, 2\\)"):
        with_draft.send_layer(1, 2, ckv, kpe, draft=True)
    t_ckv, t_kpe = prompt_kv(1, 2, TARGET)[0]
    with pytest.raises(ValueError, match="ckv must be \\[n >= 1, 24\\]"):
        with_draft.send_layer(1, 0, t_ckv, t_kpe, draft=True)


# ---------------------------------------------------------------- a hostile or buggy prefill


def _frames(room: int, layer: int, start: int, ckv: torch.Tensor, kpe: torch.Tensor) -> list:
    """A LAYER_KV as a prefill holding the cluster secret would send it."""
    return _signed(LayerKV(room, layer, start, ckv.shape[0], tensor_frame(ckv), tensor_frame(kpe)))


def _signed(msg: LayerKV | Done) -> list:
    return encode(msg, AUTH.room_keys(msg.room).to_decode)


def _raw_prefill(closing: list, endpoint: str) -> StreamPeer:
    """Sends hand-made messages to one decode rank, as a misbehaving prefill could."""
    return StreamPeer(closing, endpoint)


def _bootstrap_sink(closing: list) -> int:
    """A PULL socket standing in for the prefill's bootstrap (it takes the REGISTER and any ABORT)."""
    return owned_socket(closing, zmq.PULL, 0).bind_to_random_port("tcp://127.0.0.1")


def _fails_with(rank: Rank, match: str) -> None:
    ((event,),) = wait_events([rank.rx])
    assert isinstance(event, RoomFailed) and match in event.message, event


@pytest.mark.parametrize(
    "case, match",
    [
        ("draft-layer-to-rank-without-draft", "takes 4 layers (4 of the model, 0 of the draft)"),
        ("draft-layer-past-the-last", "takes 6 layers (4 of the model, 2 of the draft)"),
        ("draft-layer-with-target-width", "bad KV frame for layer 4"),
        ("done-before-draft-layers", "after 1 of 2 draft layers"),
        ("done-claims-draft-on-rank-without-draft", "keeps no draft"),
        ("done-denies-draft-it-sent", "finished the room without it"),
        ("draft-layer-out-of-order", "layer 5: tokens [2, 4) arrived, expected tokens from 0"),
    ],
)
def test_receiver_rejects_draft_kv_it_should_not_take(closing: list, case: str, match: str) -> None:
    port = _bootstrap_sink(closing)
    layout = _layout(2, 2, DRAFT, (0,))
    rank = Rank(layout, 1 if "without-draft" in case else 0)
    closing.append(rank)
    raw = _raw_prefill(closing, rank.rx.endpoint)
    room, n = 3, 4
    rank.expect(room, n, port)
    for layer, (ckv, kpe) in enumerate(prompt_kv(room, n, TARGET)):
        a, b = layout.latent_slice(rank.rx.rank)
        raw.send_multipart(_frames(room, layer, 0, ckv[:, a:b].contiguous(), kpe))
    d_ckv, d_kpe = prompt_kv(room, n, DRAFT)[0]
    L = TARGET.num_layers
    if case == "draft-layer-to-rank-without-draft":
        raw.send_multipart(_frames(room, L, 0, d_ckv, d_kpe))
    elif case == "draft-layer-past-the-last":
        raw.send_multipart(_frames(room, L + DRAFT.num_layers, 0, d_ckv, d_kpe))
    elif case == "draft-layer-with-target-width":
        raw.send_multipart(_frames(room, L, 0, d_ckv[:, : layout.ckv_width].contiguous(), d_kpe))
    elif case == "done-before-draft-layers":
        raw.send_multipart(_frames(room, L, 0, d_ckv, d_kpe))
        raw.send_multipart(_signed(Done(room, 7, draft_kv=True)))
    elif case == "done-claims-draft-on-rank-without-draft":
        raw.send_multipart(_signed(Done(room, 7, draft_kv=True)))
    elif case == "done-denies-draft-it-sent":
        raw.send_multipart(_frames(room, L, 0, d_ckv, d_kpe))
        raw.send_multipart(_signed(Done(room, 7, draft_kv=False)))
    elif case == "draft-layer-out-of-order":
        raw.send_multipart(_frames(room, L + 1, 2, d_ckv[2:], d_kpe[2:]))
    _fails_with(rank, match)
    assert rank.rx.stats().messages_rejected == 1
    assert all(layer < L + DRAFT.num_layers for layer in rank.layers_written)


def test_completion_waits_for_every_draft_layer(closing: list) -> None:
    """DONE with draft_kv completes the room only after the last draft layer's last tokens arrived."""
    port = _bootstrap_sink(closing)
    layout = _layout(1, 1, DRAFT, (0,))
    rank = Rank(layout, 0)
    closing.append(rank)
    raw = _raw_prefill(closing, rank.rx.endpoint)
    room, n = 4, 8
    slots = rank.expect(room, n, port)
    for layer, (ckv, kpe) in enumerate(prompt_kv(room, n, TARGET)):
        raw.send_multipart(_frames(room, layer, 0, ckv, kpe))
    draft_kv = prompt_kv(room, n, DRAFT)
    for layer, (ckv, kpe) in enumerate(draft_kv):
        raw.send_multipart(_frames(room, TARGET.num_layers + layer, 0, ckv[:5].contiguous(), kpe[:5].contiguous()))
    assert wait_until(lambda: len(rank.layers_written) == TARGET.num_layers + DRAFT.num_layers, 5.0)
    assert rank.rx.poll() == []  # all layers started, none of the draft's complete, no DONE
    for layer, (ckv, kpe) in enumerate(draft_kv):
        raw.send_multipart(_frames(room, TARGET.num_layers + layer, 5, ckv[5:].contiguous(), kpe[5:].contiguous()))
    raw.send_multipart(_signed(Done(room, 7, draft_kv=True)))
    ((event,),) = wait_events([rank.rx])
    assert isinstance(event, RoomCompleted) and event.draft_kv
    assert rank.draft_pool is not None
    for layer, (ckv, kpe) in enumerate(draft_kv):
        assert torch.equal(rank.draft_pool.read(layer, slots)[0], ckv)


def test_register_carries_the_draft_ranks() -> None:
    layout = _layout(2, 2, DRAFT, (0,))
    issued_ms, nonce = register_stamp()
    reg = Register(
        room=1, layout=layout, rank_endpoints=("tcp://a:1", "tcp://a:2"), notify_endpoint="tcp://a:1",
        n_tokens=4, max_frame_bytes=1 << 20, issued_ms=issued_ms, nonce=nonce,
    )
    header = msgpack.unpackb(encode(reg, AUTH.register_key)[0])
    assert header["v"] == PROTOCOL_VERSION and header["layout"]["draft_ranks"] == [0]
    assert decode(encode(reg, AUTH.register_key)).layout == layout
