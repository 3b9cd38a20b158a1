"""KVSender → KVReceiver over real ZMQ TCP sockets on loopback (sender and ranks in this process), each
test with and without a cluster secret."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgpack
import pytest
import torch
import zmq
from kv_stream_helpers import (
    PAGE_SIZE,
    Decode,
    StreamPeer,
    owned_socket,
    poll_until,
    prompt_kv,
    small_spec,
    wait_events,
    wait_until,
)

from tpla_serve.disagg import (
    PROTOCOL_VERSION,
    DecodeLayout,
    KVReceiver,
    KVSender,
    KVSpec,
    PromptLogprobs,
    Register,
    RoomCompleted,
    RoomFailed,
)
from tpla_serve.disagg.auth import ClusterAuth, make_tag
from tpla_serve.disagg.messages import decode as decode_message
from tpla_serve.disagg.tcp_stream import PREFIX


class Transports(list):
    """What a test opened (closed at its end, whatever happens), and the cluster secret its transports share."""

    def __init__(self, secret: str | None) -> None:
        super().__init__()
        self.secret = secret


@pytest.fixture(params=[None, "a cluster secret"], ids=["open", "authenticated"])
def closing(request: pytest.FixtureRequest) -> Iterator[Transports]:
    objs = Transports(request.param)
    yield objs
    for obj in objs:
        obj.close()


def _sender(closing: Transports, spec: KVSpec | None = None, **kwargs: object) -> KVSender:
    sender = KVSender(spec or small_spec(), secret=closing.secret, **kwargs)
    closing.append(sender)
    return sender


def _decode(
    closing: Transports, tp: int = 2, groups: int = 2, spec: KVSpec | None = None, **kwargs: object
) -> Decode:
    layout = DecodeLayout(kv=spec or small_spec(), tp_size=tp, latent_groups=groups, page_size=PAGE_SIZE)
    decode = Decode(layout, secret=closing.secret, **kwargs)
    closing.append(decode)
    return decode


def _send_all(sender: KVSender, room: int, kv: list, first_token: int = 5) -> None:
    for layer, (ckv, kpe) in enumerate(kv):
        sender.send_layer(room, layer, ckv, kpe)
    sender.send_done(room, first_token, -0.75)


@pytest.mark.parametrize("groups", [2, 1])
@pytest.mark.parametrize("register_first", [True, False], ids=["register-first", "layers-first"])
def test_each_rank_receives_exactly_its_slice(closing: Transports, groups: int, register_first: bool) -> None:
    sender, decode = _sender(closing), _decode(closing, groups=groups)
    room, n = 2**62 + 17, 11
    kv = prompt_kv(room, n, sender.kv)
    if register_first:
        decode.expect(room, n, sender.bootstrap_port)
        assert wait_until(lambda: sender.stats().rooms_registered == 1, 5.0)
        _send_all(sender, room, kv)
    else:
        _send_all(sender, room, kv)
        time.sleep(0.05)  # the layers are buffered on the prefill before the decode registers
        decode.expect(room, n, sender.bootstrap_port)
    events = decode.events()
    for rank_events in events:
        assert len(rank_events) == 1 and isinstance(rank_events[0], RoomCompleted), rank_events
        done = rank_events[0]
        assert (done.room, done.first_token_id, done.first_token_logprob) == (room, 5, -0.75)
        assert done.nbytes == n * sender.kv.num_layers * (16 // groups + 8) * 2
    decode.assert_holds(room, kv)
    assert sender.poll() == [] and sender.stats().rooms_live == 0
    assert all(rx.stats().rooms_live == 0 for rx in decode.rx)


def test_chunked_prefill_and_frame_limit_split_tokens_on_page_boundaries(closing: Transports) -> None:
    sender = _sender(closing)
    # 9 tokens of the widest row (16 dims of bf16) fit a frame: chunks of 8 (two pages of 4).
    decode = _decode(closing, groups=1, max_frame_bytes=9 * 16 * 2)
    room, n = 7, 30
    kv = prompt_kv(room, n, sender.kv)
    decode.expect(room, n, sender.bootstrap_port)
    for layer, (ckv, kpe) in enumerate(kv):  # prefill in two chunks: tokens [0, 19) and [19, 30)
        sender.send_layer(room, layer, ckv[:19], kpe[:19])
    for layer, (ckv, kpe) in enumerate(kv):
        sender.send_layer(room, layer, ckv[19:], kpe[19:], token_start=19)
    sender.send_done(room, 1)
    assert all(isinstance(e[0], RoomCompleted) for e in decode.events())
    decode.assert_holds(room, kv)
    starts = sorted({(start, count) for _, start, count, _ in decode.ranks[0].calls})
    assert starts == [(0, 8), (8, 8), (16, 3), (19, 8), (27, 3)]


def test_prompt_logprobs_reach_rank_zero_only(closing: Transports) -> None:
    sender, decode = _sender(closing), _decode(closing)
    room, n = 99, 6
    kv = prompt_kv(room, n, sender.kv)
    decode.expect(room, n, sender.bootstrap_port)
    lp = PromptLogprobs(
        start=1,
        logprobs=torch.randn(5),
        top_logprobs=torch.randn(5, 2),
        top_ids=torch.arange(10, dtype=torch.int32).view(5, 2),
    )
    for layer, (ckv, kpe) in enumerate(kv):
        sender.send_layer(room, layer, ckv, kpe)
    sender.send_done(room, 3, None, lp)
    (r0,), (r1,) = decode.events()
    assert isinstance(r0, RoomCompleted) and isinstance(r1, RoomCompleted)
    assert r0.prompt_logprobs is not None and r1.prompt_logprobs is None
    assert torch.equal(r0.prompt_logprobs.logprobs, lp.logprobs)
    assert torch.equal(r0.prompt_logprobs.top_ids, lp.top_ids)
    assert r0.first_token_logprob is None and r1.first_token_id == 3


@pytest.mark.parametrize(
    "decode_spec, field",
    [
        (small_spec(fingerprint="other-transform"), "fingerprint"),
        (small_spec(kv_lora_rank=32), "kv_lora_rank"),
        (small_spec(rope_dim=16), "rope_dim"),
        (small_spec(num_layers=5), "num_layers"),
        (small_spec(dtype="float16"), "dtype"),
    ],
)
def test_layout_mismatch_fails_both_sides_with_the_field_named(
    closing: Transports, decode_spec: KVSpec, field: str
) -> None:
    sender, decode = _sender(closing), _decode(closing, spec=decode_spec)
    room, n = 5, 4
    kv = prompt_kv(room, n, sender.kv)
    _send_all(sender, room, kv)  # the prefill already knows the room when the REGISTER is refused
    decode.expect(room, n, sender.bootstrap_port)
    for (event,) in decode.events():
        assert isinstance(event, RoomFailed) and f"{field} mismatch" in event.message, event
    (failed,) = poll_until(sender)
    assert isinstance(failed, RoomFailed) and failed.room == room and f"{field} mismatch" in failed.message
    assert all(rx.stats().rooms_live == 0 for rx in decode.rx) and sender.stats().rooms_live == 0


def test_refused_register_is_reported_when_the_prefill_reaches_the_room(closing: Transports) -> None:
    sender, decode = _sender(closing), _decode(closing, spec=small_spec(fingerprint="x"))
    room = 77
    decode.expect(room, 4, sender.bootstrap_port)
    assert all(isinstance(e[0], RoomFailed) for e in decode.events())
    # The decode's ABORT came back, so the prefill has refused the REGISTER (fingerprint mismatch).
    assert sender.stats().rooms_registered == 0 and sender.stats().rooms_live == 0
    assert sender.poll() == []  # the engine had not touched the room yet
    ckv, kpe = prompt_kv(room, 4, sender.kv)[0]
    sender.send_layer(room, 0, ckv, kpe)
    (failed,) = poll_until(sender)
    assert "fingerprint mismatch" in failed.message


@pytest.mark.parametrize(
    "prefill_tokens, match", [(12, "at least 12 prompt tokens"), (8, "finished with 8 tokens")]
)
def test_prompt_length_disagreement_fails_the_room(closing: Transports, prefill_tokens: int, match: str) -> None:
    sender, decode = _sender(closing), _decode(closing)
    room = 3
    decode.expect(room, 10, sender.bootstrap_port)
    assert wait_until(lambda: sender.stats().rooms_registered == 1, 5.0)
    _send_all(sender, room, prompt_kv(room, prefill_tokens, sender.kv))
    for (event,) in decode.events():
        assert isinstance(event, RoomFailed) and match in event.message, event
    assert match in poll_until(sender)[0].message


def test_cancel_tells_the_prefill_and_the_other_ranks(closing: Transports) -> None:
    sender, decode = _sender(closing), _decode(closing)
    room, n = 11, 8
    kv = prompt_kv(room, n, sender.kv)
    decode.expect(room, n, sender.bootstrap_port)
    assert wait_until(lambda: sender.stats().rooms_registered == 1, 5.0)
    sender.send_layer(room, 0, *kv[0])
    assert wait_until(lambda: len(decode.ranks[0].calls) > 0, 5.0)
    assert decode.rx[0].cancel(room) is True
    assert decode.rx[0].cancel(room) is False
    (failed,) = poll_until(sender)
    assert failed.room == room and "aborted by the client" in failed.message
    (rank1,) = wait_events([decode.rx[1]])[0]
    assert isinstance(rank1, RoomFailed) and "aborted by the client" in rank1.message
    for layer in range(1, len(kv)):  # the engine's late calls for the dead room are ignored
        sender.send_layer(room, layer, *kv[layer])
    sender.send_done(room, 0)
    time.sleep(0.1)
    assert decode.rx[0].poll() == [] and sender.poll() == []
    assert sender.stats().rooms_live == 0 and decode.rx[1].stats().rooms_live == 0


def test_decode_room_expires_when_no_kv_arrives(closing: Transports) -> None:
    sender = _sender(closing, timeout_s=30.0)
    decode = _decode(closing, timeout_s=0.5)
    room = 12
    start = time.monotonic()
    decode.expect(room, 4, sender.bootstrap_port)
    assert wait_until(lambda: sender.stats().rooms_registered == 1, 5.0)  # the prefill never computes it
    events = decode.events(timeout_s=5.0)
    assert time.monotonic() - start < 3.0
    for (event,) in events:
        assert (
            isinstance(event, RoomFailed)
            and "timed out" in event.message
            and "0 of 4 layers" in event.message
        )
    # rank 0's timeout ABORTs the room on the prefill too: the engine hears it once it reaches the room
    assert wait_until(lambda: sender.stats().rooms_live == 0 and sender.stats().rooms_failed == 1, 5.0)
    sender.send_layer(room, 0, *prompt_kv(room, 4, sender.kv)[0])
    (failed,) = poll_until(sender)
    assert "timed out" in failed.message


def test_unregistered_room_expires_on_the_prefill_and_late_register_is_refused(closing: Transports) -> None:
    sender, decode = _sender(closing, timeout_s=0.3), _decode(closing)
    room = 13
    _send_all(sender, room, prompt_kv(room, 4, sender.kv))
    (failed,) = poll_until(sender)
    assert "waiting for the decode server to register" in failed.message
    decode.expect(room, 4, sender.bootstrap_port)
    for (event,) in decode.events():
        assert isinstance(event, RoomFailed) and "already ended on the prefill" in event.message


def test_prefill_buffer_cap_aborts_the_room(closing: Transports) -> None:
    sender, decode = _sender(closing, max_buffered_bytes_per_room=1000), _decode(closing)
    room, n = 14, 16  # one layer is 16 * (16 + 8) * 2 = 768 bytes: the second overflows
    _send_all(sender, room, prompt_kv(room, n, sender.kv))
    assert "more than 1000 bytes" in poll_until(sender)[0].message
    assert sender.stats().rooms_live == 0
    decode.expect(room, n, sender.bootstrap_port)
    for (event,) in decode.events():
        assert isinstance(event, RoomFailed) and "more than 1000 bytes" in event.message


def test_writer_error_fails_the_room_and_tells_the_prefill(closing: Transports) -> None:
    sender, decode = _sender(closing), _decode(closing, tp=1, groups=1)

    def broken(layer: int, start: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        raise RuntimeError("page table corrupt")

    room = 15
    decode.rx[0].expect(room, 4, broken, "127.0.0.1", sender.bootstrap_port)
    decode.rx[0].send_register(room, decode.endpoints)
    sender.send_layer(room, 0, *prompt_kv(room, 4, sender.kv)[0])
    ((event,),) = decode.events()
    assert isinstance(event, RoomFailed) and "page table corrupt" in event.message
    assert "page table corrupt" in poll_until(sender)[0].message


def _raw_push(closing: Transports, endpoint: str) -> zmq.Socket:
    sock = owned_socket(closing, zmq.PUSH, 1000)
    sock.connect(endpoint)
    return sock


def _layer_header(closing: Transports, room: int, layer: int, start: int, n: int) -> list[bytes]:
    """A LAYER_KV header and its tag, as a prefill holding the test's secret would send them."""
    header = msgpack.packb(
        {"v": PROTOCOL_VERSION, "t": 2, "room": room, "layer": layer, "token_start": start, "n_tokens": n,
         "n_layers": 1}
    )
    return [header, make_tag(ClusterAuth(closing.secret).room_keys(room).to_decode, header)]


def test_malformed_frames_are_rejected_and_the_receiver_keeps_working(closing: Transports) -> None:
    sender = _sender(closing)
    decode = _decode(closing, tp=1, groups=1, max_frame_bytes=4096)
    rx = decode.rx[0]
    victim = 21
    decode.expect(victim, 4, sender.bootstrap_port, register=False)
    raw = StreamPeer(closing, rx.endpoint)
    width, rope = 16, 8
    bad = [
        [b"\xc1not msgpack"],
        [msgpack.packb({"v": PROTOCOL_VERSION, "t": 42})],
        [msgpack.packb({"v": 999, "t": 2})],
        [*_layer_header(closing, 404, 0, 0, 1), b"\0" * width * 2, b"\0" * rope * 2],  # unknown room: dropped
        [*_layer_header(closing, victim, 0, 0, 2**20), b"", b""],  # declares far more tokens than expected
    ]
    for frames in bad:
        raw.send_multipart(frames)
    assert wait_until(lambda: rx.stats().messages_rejected >= 3 and rx.stats().messages_dropped >= 1, 5.0)
    ((event,),) = decode.events()
    assert isinstance(event, RoomFailed) and event.room == victim and "tokens [0, 1048576)" in event.message
    # Wrong frame size for a live room fails that room only.
    victim2 = 22
    decode.expect(victim2, 4, sender.bootstrap_port, register=False)
    raw.send_multipart([*_layer_header(closing, victim2, 0, 0, 4), b"\0" * (4 * width * 2 + 2), b"\0" * 4 * rope * 2])
    ((event,),) = decode.events()
    assert event.room == victim2 and "bad KV frame" in event.message
    # A frame over max_frame_bytes closes that connection before anything is allocated for it.
    rejected = rx.stats().messages_rejected
    raw.send_multipart([*_layer_header(closing, victim2, 0, 0, 4), b"\0" * 10_000, b""])
    assert raw.closed_by_peer()
    assert rx.stats().messages_rejected == rejected + 1
    # So does an envelope that declares a header past its limit, or too many frames.
    for envelope in (PREFIX.pack(1 << 30, 2), PREFIX.pack(8, 200)):
        peer = StreamPeer(closing, rx.endpoint)
        peer.send_raw(envelope)
        assert peer.closed_by_peer()
    # A good room still streams end to end.
    room, n = 23, 9
    kv = prompt_kv(room, n, sender.kv)
    decode.expect(room, n, sender.bootstrap_port)
    _send_all(sender, room, kv)
    ((event,),) = decode.events()
    assert isinstance(event, RoomCompleted), event
    decode.assert_holds(room, kv)
    assert rx.stats().rooms_live == 0 and rx.stats().rooms_failed == 2


def test_malformed_bootstrap_messages_are_rejected_and_the_sender_keeps_working(closing: Transports) -> None:
    sender, decode = _sender(closing), _decode(closing)
    raw = _raw_push(closing, sender.bootstrap_endpoint)
    raw.send_multipart([b"\x00\x01"])
    raw.send_multipart([*_layer_header(closing, 1, 0, 0, 1), b"\0" * 32, b"\0" * 16])  # not a bootstrap message
    raw.send_multipart([b"\x80" * 100_000])  # over the bootstrap frame limit: connection dropped
    assert wait_until(lambda: sender.stats().messages_rejected >= 2, 5.0)
    room, n = 31, 5
    kv = prompt_kv(room, n, sender.kv)
    decode.expect(room, n, sender.bootstrap_port)
    _send_all(sender, room, kv)
    assert all(isinstance(e[0], RoomCompleted) for e in decode.events())
    decode.assert_holds(room, kv)


def test_api_validation(closing: Transports) -> None:
    sender = _sender(closing)
    bootstrap = owned_socket(closing, zmq.PULL, 0)  # a prefill's bootstrap socket, read raw
    decode = _decode(closing, tp=1, groups=1,
                     default_bootstrap_port=bootstrap.bind_to_random_port("tcp://127.0.0.1"))
    rx = decode.rx[0]
    writer = decode.ranks[0].writer(decode.ranks[0].reserve(4))
    rx.expect(1, 4, writer, "127.0.0.1", None)  # null port: this server's default
    rx.send_register(1, decode.endpoints)
    assert bootstrap.poll(5000)
    reg = decode_message(bootstrap.recv_multipart(copy=False))
    assert isinstance(reg, Register) and reg.n_tokens == 4 and reg.rank_endpoints == (rx.endpoint,)
    with pytest.raises(ValueError, match="already expected"):
        rx.expect(1, 4, writer, "127.0.0.1", None)
    with pytest.raises(ValueError, match="not expected"):
        rx.send_register(2, decode.endpoints)
    with pytest.raises(ValueError, match="rank_endpoints has 2 entries"):
        rx.send_register(1, decode.endpoints * 2)
    with pytest.raises(ValueError, match="bootstrap_room"):
        rx.expect(2**63, 4, writer, "127.0.0.1", None)
    with pytest.raises(ValueError, match="n_tokens"):
        rx.expect(2, 0, writer, "127.0.0.1", None)
    ckv, kpe = prompt_kv(1, 4, sender.kv)[0]
    with pytest.raises(ValueError, match="layer"):
        sender.send_layer(1, 4, ckv, kpe)
    with pytest.raises(ValueError, match="ckv must be"):
        sender.send_layer(1, 0, ckv[:, :8], kpe)
    with pytest.raises(ValueError, match="kpe must be"):
        sender.send_layer(1, 0, ckv, kpe[:3])
    with pytest.raises(ValueError, match="dtype"):
        sender.send_layer(1, 0, ckv.float(), kpe)
    with pytest.raises(ValueError, match="first_token_id"):
        sender.send_done(1, -1)
    no_default = KVReceiver(decode.layout, 0)
    closing.append(no_default)
    with pytest.raises(ValueError, match="no default bootstrap port"):
        no_default.expect(1, 4, writer, "127.0.0.1", None)


def test_prefill_abort_reaches_every_rank_and_a_late_register(closing: Transports) -> None:
    sender, decode = _sender(closing), _decode(closing)
    room, n = 41, 4
    kv = prompt_kv(room, n, sender.kv)
    decode.expect(room, n, sender.bootstrap_port)
    assert wait_until(lambda: sender.stats().rooms_registered == 1, 5.0)
    sender.send_layer(room, 0, *kv[0])
    sender.abort(room, "prefill out of memory")
    for (event,) in decode.events():
        assert isinstance(event, RoomFailed) and "prefill out of memory" in event.message
    assert sender.poll() == []  # the engine ended the room itself
    late = 42  # aborted by the prefill before its decode registered
    sender.abort(late, "client disconnected from the prefill")
    decode.expect(late, n, sender.bootstrap_port)
    for (event,) in decode.events():
        assert isinstance(event, RoomFailed) and "client disconnected from the prefill" in event.message


def test_sender_outlives_a_decode_server_that_dies_mid_stream(closing: Transports) -> None:
    sender = _sender(closing, timeout_s=1.0)
    dead = Decode(DecodeLayout(kv=small_spec(), tp_size=2, latent_groups=2, page_size=PAGE_SIZE), secret=closing.secret)
    room, n = 51, 8
    kv = prompt_kv(room, n, sender.kv)
    dead.expect(room, n, sender.bootstrap_port)
    assert wait_until(lambda: sender.stats().rooms_registered == 1, 5.0)
    sender.send_layer(room, 0, *kv[0])
    assert wait_until(lambda: all(r.calls for r in dead.ranks), 5.0)
    dead.close()
    for layer in range(1, len(kv)):
        sender.send_layer(room, layer, *kv[layer])
    sender.send_done(room, 0)
    decode = _decode(closing)
    room2 = 52
    kv2 = prompt_kv(room2, n, sender.kv)
    decode.expect(room2, n, sender.bootstrap_port)
    _send_all(sender, room2, kv2)
    assert all(isinstance(e[0], RoomCompleted) for e in decode.events())
    decode.assert_holds(room2, kv2)
    assert sender.stats().rooms_live == 0 and sender.stats().staging_bytes == 0
    # The dead server's room ended either as sent or, if a write failed first, as failed saying why.
    assert all(e.room == 51 and "cannot send" in e.message for e in sender.poll())
