"""Peers of the KV stream must prove the cluster secret, and one decode server may hold only so much.

Forged or replayed messages reach real sockets from raw ZMQ peers; each test then checks what the
transport kept (room slots, open sockets, counters) and that a genuine room still arrives byte-exact.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import msgpack
import pytest
import zmq
from kv_stream_helpers import (
    PAGE_SIZE,
    Decode,
    StreamPeer,
    StreamTap,
    owned_socket,
    prompt_kv,
    small_spec,
    wait_events,
    wait_until,
)

from tpla_serve.disagg import (
    Abort,
    DecodeLayout,
    Done,
    KVReceiver,
    KVSender,
    LayerKV,
    Register,
    RoomCompleted,
    RoomFailed,
    decode,
    encode,
)
from tpla_serve.disagg.auth import TAG_BYTES, ClusterAuth, register_stamp, signed_by, wall_clock_ms
from tpla_serve.disagg.messages import tensor_frame

SECRET = "correct horse battery staple"
AUTH = ClusterAuth(SECRET)
SPEC = small_spec()
LAYOUT = DecodeLayout(kv=SPEC, tp_size=2, latent_groups=2, page_size=PAGE_SIZE)


@pytest.fixture
def closing() -> Iterator[list]:
    objs: list = []
    yield objs
    for obj in objs:
        obj.close()


def _sender(closing: list, **kwargs: object) -> KVSender:
    sender = KVSender(SPEC, secret=SECRET, **kwargs)
    closing.append(sender)
    return sender


def _decode(closing: list, layout: DecodeLayout = LAYOUT, secret: str | None = SECRET, **kwargs: object) -> Decode:
    decode_ = Decode(layout, secret=secret, **kwargs)
    closing.append(decode_)
    return decode_


def _push(closing: list, endpoint: str) -> zmq.Socket:
    sock = owned_socket(closing, zmq.PUSH, 1000)
    sock.connect(endpoint)
    return sock


def _pull(closing: list) -> tuple[zmq.Socket, str]:
    """A peer's PULL socket and its endpoint (a fake decode rank, or a bootstrap tap)."""
    sock = owned_socket(closing, zmq.PULL, 0)
    return sock, f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"


def _register(room: int, endpoints: list[str], key: bytes = AUTH.register_key, layout: DecodeLayout = LAYOUT,
              issued_ms: int | None = None, n_tokens: int = 8) -> list[bytes]:
    now_ms, nonce = register_stamp()
    reg = Register(room, layout, tuple(endpoints), endpoints[0], n_tokens, 1 << 20,
                   now_ms if issued_ms is None else issued_ms, nonce)
    return [bytes(memoryview(f)) for f in encode(reg, key)]


def _send_all(sender: KVSender, room: int, kv: list) -> None:
    for layer, (ckv, kpe) in enumerate(kv):
        sender.send_layer(room, layer, ckv, kpe)
    sender.send_done(room, 5, -0.75)


def _completes(sender: KVSender, decode_: Decode, room: int, n: int = 8, expect: bool = True) -> None:
    """A genuine room (expected and registered here unless `expect` is False) streams end to end and lands
    byte-exact on every rank."""
    kv = prompt_kv(room, n, SPEC)
    if expect:
        decode_.expect(room, n, sender.bootstrap_port)
    _send_all(sender, room, kv)
    for events in decode_.events():
        assert len(events) == 1 and isinstance(events[0], RoomCompleted), events
    decode_.assert_holds(room, kv)


def _forged_registers() -> dict[str, object]:
    """Ways to REGISTER without proving the secret, by what they change in a genuine REGISTER's frames."""

    def with_key(key: bytes):
        return lambda room, eps: _register(room, eps, key=key)

    def header_changed(room: int, eps: list[str]) -> list[bytes]:
        header, tag = _register(room, eps)
        fields = msgpack.unpackb(header)
        return [msgpack.packb({**fields, "n_tokens": fields["n_tokens"] + 1}), tag]

    now = wall_clock_ms()
    return {
        "another-secret": with_key(ClusterAuth("another secret").register_key),
        "no-secret": with_key(ClusterAuth(None).register_key),
        "zero-tag": lambda room, eps: [_register(room, eps)[0], b"\0" * TAG_BYTES],
        "header-changed": header_changed,
        "stale": lambda room, eps: _register(room, eps, issued_ms=now - 120_000),
        "from-the-future": lambda room, eps: _register(room, eps, issued_ms=now + 120_000),
    }


@pytest.mark.parametrize("case", list(_forged_registers()))
def test_a_forged_register_takes_no_room_and_opens_no_socket(closing: list, case: str) -> None:
    sender = _sender(closing, max_rooms=1)
    thief = StreamTap(closing)
    thief_endpoint = thief.endpoint
    room = 101
    _push(closing, sender.bootstrap_endpoint).send_multipart(_forged_registers()[case](room, [thief_endpoint] * 2))
    assert wait_until(lambda: sender.stats().messages_unauthenticated == 1, 5.0)
    stats = sender.stats()
    assert (stats.rooms_live, stats.sockets_open, stats.messages_rejected) == (0, 0, 0)
    _completes(sender, _decode(closing), room)  # the only room slot is still free, for the same room id
    assert sender.stats().sockets_open == 2 and thief.poll(0) == 0


def test_a_register_without_a_tag_is_malformed_and_dropped(closing: list) -> None:
    sender = _sender(closing)
    thief_endpoint = StreamTap(closing).endpoint
    _push(closing, sender.bootstrap_endpoint).send_multipart(_register(102, [thief_endpoint] * 2)[:1])
    assert wait_until(lambda: sender.stats().messages_rejected == 1, 5.0)
    assert (sender.stats().rooms_live, sender.stats().sockets_open) == (0, 0)


def test_a_fake_decode_cannot_take_a_room_the_prefill_is_computing(closing: list) -> None:
    sender, decode_ = _sender(closing), _decode(closing)
    thief = StreamTap(closing)
    thief_endpoint = thief.endpoint
    room, n = 103, 8
    kv = prompt_kv(room, n, SPEC)
    _send_all(sender, room, kv)  # buffered on the prefill until its decode registers
    forged = _register(room, [thief_endpoint] * 2, key=ClusterAuth("guess").register_key, n_tokens=n)
    _push(closing, sender.bootstrap_endpoint).send_multipart(forged)
    assert wait_until(lambda: sender.stats().messages_unauthenticated == 1, 5.0)
    assert sender.stats().rooms_registered == 0
    decode_.expect(room, n, sender.bootstrap_port)
    for (event,) in decode_.events():
        assert isinstance(event, RoomCompleted), event
    decode_.assert_holds(room, kv)
    assert sender.stats().sockets_open == 2 and thief.poll(0) == 0


def test_a_replayed_register_is_refused_and_the_room_completes(closing: list) -> None:
    sender = _sender(closing)
    tap, tap_endpoint = _pull(closing)  # the genuine REGISTER goes here first, as an eavesdropper would see it
    decode_ = _decode(closing, default_bootstrap_port=int(tap_endpoint.rsplit(":", 1)[1]))
    room, n = 104, 8
    kv = prompt_kv(room, n, SPEC)
    decode_.expect(room, n, None)
    assert tap.poll(5000)
    genuine = tap.recv_multipart()
    push = _push(closing, sender.bootstrap_endpoint)
    push.send_multipart(genuine)
    assert wait_until(lambda: sender.stats().rooms_registered == 1, 5.0)
    push.send_multipart(genuine)
    assert wait_until(lambda: sender.stats().messages_unauthenticated == 1, 5.0)
    assert sender.stats().rooms_registered == 1  # not "registered twice": the replay never reached the room
    _send_all(sender, room, kv)
    for (event,) in decode_.events():
        assert isinstance(event, RoomCompleted), event
    decode_.assert_holds(room, kv)


def test_a_flood_of_forged_registers_does_not_stop_a_genuine_room(
    closing: list, caplog: pytest.LogCaptureFixture
) -> None:
    sender = _sender(closing)  # 1,024 room slots
    bogus = [f"tcp://10.{i // 250}.{i % 250}.1:9" for i in range(64)]
    layout = DecodeLayout(kv=SPEC, tp_size=64, latent_groups=1, page_size=PAGE_SIZE)
    push = _push(closing, sender.bootstrap_endpoint)
    with caplog.at_level(logging.WARNING, logger="tpla_serve.disagg"):
        for room in range(1100):
            header, _ = _register(room, bogus, layout=layout)
            push.send_multipart([header, os.urandom(TAG_BYTES)])
        assert wait_until(lambda: sender.stats().messages_unauthenticated == 1100, 30.0)
        stats = sender.stats()
        assert (stats.rooms_live, stats.sockets_open) == (0, 0)
        _completes(sender, _decode(closing), 5000)
    refused = [r for r in caplog.records if "refused REGISTER" in r.getMessage()]
    assert 1 <= len(refused) <= 3, [r.getMessage() for r in refused]  # rate-limited, not one line per message


def test_a_register_naming_1000_endpoints_is_refused_without_connecting_to_them(closing: list) -> None:
    sender = _sender(closing)
    notify = StreamTap(closing)
    notify_endpoint = notify.endpoint
    endpoints = [notify_endpoint] + [f"tcp://10.9.{i // 250}.{i % 250}:9" for i in range(999)]
    layout = DecodeLayout(kv=SPEC, tp_size=1000, latent_groups=1, page_size=PAGE_SIZE)
    room = 105
    push = _push(closing, sender.bootstrap_endpoint)
    push.send_multipart(_register(room, endpoints, key=ClusterAuth("guess").register_key, layout=layout))
    assert wait_until(lambda: sender.stats().messages_unauthenticated == 1, 5.0)
    assert sender.stats().sockets_open == 0  # forged: not even its notify endpoint hears of it
    # From a decode server that holds the secret, only the notify endpoint hears why.
    push.send_multipart(_register(room, endpoints, layout=layout))
    frames = notify.recv_multipart(5.0)
    abort = decode(frames)
    assert isinstance(abort, Abort) and abort.room == room and signed_by(AUTH.room_keys(room).to_decode, frames)
    assert "names 1000 endpoints, more than the 64" in abort.message
    stats = sender.stats()
    assert (stats.rooms_live, stats.sockets_open, stats.messages_unauthenticated) == (0, 1, 1)  # the notify only


def test_one_decode_server_cannot_take_every_room(closing: list) -> None:
    sender = _sender(closing, max_peer_rooms=2)
    greedy, other = _decode(closing), _decode(closing)
    for room in (1, 2, 3):
        greedy.expect(room, 8, sender.bootstrap_port)
    for (event,) in wait_events(greedy.rx):  # the prefill's ABORT reaches every rank of the refused room
        assert isinstance(event, RoomFailed) and event.room == 3, event
        assert "already has 2 rooms in flight on this prefill (at most 2)" in event.message
    _completes(sender, other, 4)
    for room in (1, 2):  # the greedy server's own rooms are served as usual
        _send_all(sender, room, prompt_kv(room, 8, SPEC))
    for events in wait_events(greedy.rx, per_rank=2):
        assert sorted(e.room for e in events if isinstance(e, RoomCompleted)) == [1, 2]


def test_the_prefill_opens_no_more_sockets_than_allowed(closing: list) -> None:
    sender = _sender(closing, max_sockets=3)
    first, second = _decode(closing), _decode(closing)
    _completes(sender, first, 1)
    second.expect(2, 8, sender.bootstrap_port)
    (event,) = wait_events(second.rx[:1])[0]
    assert isinstance(event, RoomFailed) and "2 of its 3 connections to decode servers open" in event.message
    assert sender.stats().sockets_open == 3  # the first server's two ranks, and the refused one's notify


def _forged_room_messages(room: int) -> list[list]:
    """LAYER_KV, DONE and ABORT for `room` with its id right but not its prefill → decode key."""
    ckv, kpe = prompt_kv(room, 8, SPEC)[0]
    layer = LayerKV(room, 0, 0, 8, tensor_frame(ckv[:, :8].contiguous()), tensor_frame(kpe))
    wrong, reflected = ClusterAuth("another secret").room_keys(room).to_decode, AUTH.room_keys(room).to_prefill
    messages = [encode(m, key) for m in (layer, Done(room, 0), Abort(room, "forged")) for key in (wrong, reflected)]
    zero_tag = encode(Done(room, 0), wrong)
    return [*messages, [zero_tag[0], b"\0" * TAG_BYTES]]


def test_forged_kv_done_and_abort_for_an_expected_room_are_dropped(closing: list) -> None:
    sender, decode_ = _sender(closing), _decode(closing)
    room, n = 106, 8
    decode_.expect(room, n, sender.bootstrap_port)
    assert wait_until(lambda: sender.stats().rooms_registered == 1, 5.0)
    forged = _forged_room_messages(room)
    for endpoint in decode_.endpoints:
        push = StreamPeer(closing, endpoint)
        for frames in forged:
            push.send_multipart(frames)
    decode_abort = encode(Abort(room, "forged"), ClusterAuth("another secret").room_keys(room).to_prefill)
    _push(closing, sender.bootstrap_endpoint).send_multipart(decode_abort)
    assert wait_until(lambda: all(rx.stats().messages_unauthenticated == len(forged) for rx in decode_.rx), 5.0)
    assert wait_until(lambda: sender.stats().messages_unauthenticated == 1, 5.0)
    assert all(r.calls == [] for r in decode_.ranks) and sender.stats().rooms_registered == 1
    _completes(sender, decode_, room, n, expect=False)
    assert all(rx.stats().messages_rejected == 0 for rx in decode_.rx)


@pytest.mark.parametrize("decode_secret", ["another secret", None])
def test_servers_with_different_secrets_refuse_each_other_and_say_why(closing: list, decode_secret) -> None:
    sender = _sender(closing)
    decode_ = _decode(closing, secret=decode_secret, timeout_s=0.5)
    decode_.expect(107, 8, sender.bootstrap_port)
    for (event,) in decode_.events():
        assert isinstance(event, RoomFailed) and "timed out" in event.message
    assert "none at all: is --disaggregation-secret the same on both servers?" in event.message
    # The REGISTER and then both ranks' ABORTs on timeout, all dropped unread.
    assert wait_until(lambda: sender.stats().messages_unauthenticated == 3, 5.0)
    assert (sender.stats().rooms_live, sender.stats().sockets_open) == (0, 0)


def test_a_decode_rank_opens_no_more_sockets_than_allowed(closing: list) -> None:
    decode_ = _decode(closing, layout=DecodeLayout(kv=SPEC, tp_size=1, latent_groups=1, page_size=PAGE_SIZE),
                      max_sockets=1)
    (_, first), (_, second) = _pull(closing), _pull(closing)
    for room, bootstrap in ((1, first), (2, second)):
        decode_.expect(room, 8, int(bootstrap.rsplit(":", 1)[1]))
    ((event,),) = decode_.events()
    assert event.room == 2 and "already has the 1 connections it may open" in event.message


def test_a_full_receiver_refuses_a_room_with_a_value_error(closing: list) -> None:
    rx = KVReceiver(LAYOUT, 0, secret=SECRET, max_rooms=1, default_bootstrap_port=9)
    closing.append(rx)
    rx.expect(1, 4, lambda *args: None, "127.0.0.1", None)
    with pytest.raises(ValueError, match="decode rank 0 already expects 1 rooms, the most it takes at once"):
        rx.expect(2, 4, lambda *args: None, "127.0.0.1", None)


def test_without_a_secret_the_transports_warn_once_naming_the_flag(
    closing: list, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tpla_serve.disagg"):
        closing.append(KVSender(SPEC))
        closing.extend(KVReceiver(LAYOUT, r) for r in range(2))
        closing.append(KVSender(SPEC, secret=SECRET))
        closing.extend(KVReceiver(LAYOUT, r, secret=SECRET) for r in range(2))
    warnings = [r.getMessage() for r in caplog.records if "accepts KV transfer messages from any peer" in r.getMessage()]
    assert len(warnings) == 2  # the sender and decode rank 0, of the two without a secret
    assert all("--disaggregation-secret" in w for w in warnings)


def test_the_secret_never_reaches_the_logs(closing: list, caplog: pytest.LogCaptureFixture) -> None:
    # The project's logger set here, not just the root: an in-process Engine elsewhere may have raised its level.
    with caplog.at_level(logging.DEBUG, logger="tpla_serve"):
        sender = _sender(closing)
        _completes(sender, _decode(closing), 1)
        forged = _forged_room_messages(2)
        decode_ = _decode(closing, timeout_s=2.0)
        decode_.expect(2, 8, sender.bootstrap_port)
        push = StreamPeer(closing, decode_.endpoints[0])
        for frames in forged:
            push.send_multipart(frames)
        # Each one read and dropped while the room is expected (so logged as forged, not as unexpected) ...
        assert wait_until(lambda: decode_.rx[0].stats().messages_unauthenticated == len(forged), 2.0)
        decode_.events()  # ... then the room times out: the prefill never computes it
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert caplog.records and SECRET not in text
    assert SECRET not in repr(AUTH) and SECRET not in repr(AUTH.room_keys(1))
