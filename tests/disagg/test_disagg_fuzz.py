"""A bounded fuzz pass over the KV stream's decoder (hypothesis, a few hundred cases, deterministic).

Whatever a peer sends, `messages.decode` returns a message or raises ProtocolError, and allocates little
more than the bytes it was given: random msgpack-shaped headers and frames, raw bytes, and valid messages
mutated field by field or byte by byte.
"""

from __future__ import annotations

import tracemalloc

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpla_serve.disagg import (
    Abort,
    DecodeLayout,
    Done,
    KVSpec,
    LayerKV,
    PromptLogprobs,
    ProtocolError,
    Register,
    TopLogprobs,
    decode,
    encode,
)
from tpla_serve.disagg.auth import NONCE_BYTES, TAG_BYTES
from tpla_serve.disagg.messages import PROTOCOL_VERSION, tensor_frame

FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
KEY = bytes(32)
MAX_DECODE_BYTES = 1 << 20  # what one decode may allocate beyond its input, at most
FIELDS = ["v", "t", "room", "layer", "token_start", "n_tokens", "n_layers", "lanes", "first_token_id",
          "first_token_logprob", "prompt_logprobs", "draft_kv", "message", "layout", "rank_endpoints",
          "notify_endpoint", "max_frame_bytes", "issued_ms", "nonce", "tp_size", "latent_groups", "page_size", "kv", "draft",
          "draft_ranks", "num_layers", "kv_lora_rank", "rope_dim", "dtype", "fingerprint", "start", "n", "k"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
    | st.binary(max_size=24)
    | st.sampled_from(["bfloat16", "float8_e4m3fn", "tcp://127.0.0.1:5", "ipc:///tmp/x", "tcp://*:1"])
)
keys = st.sampled_from(FIELDS) | st.text(max_size=8) | st.binary(max_size=4)  # msgpack map keys: str or bytes
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=8
)
headers = st.dictionaries(keys, values, max_size=10).map(lambda h: h if "v" in h else {"v": PROTOCOL_VERSION, **h})
frame_bytes = st.binary(max_size=96) | st.just(b"\0" * TAG_BYTES)


def _decodes_or_refuses(frames: list[bytes]) -> None:
    tracemalloc.start()  # traces this decode only: hypothesis's own allocations stay out (and fast)
    try:
        msg = decode(frames)
    except ProtocolError:
        msg = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert msg is None or isinstance(msg, (Register, LayerKV, Done, Abort))
    assert peak < MAX_DECODE_BYTES + sum(map(len, frames)), peak


@FUZZ
@given(header=headers, tag=st.integers(1, 6), payload=st.lists(frame_bytes, max_size=4), has_tag=st.booleans())
def test_random_headers(header: dict, tag: int, payload: list[bytes], has_tag: bool) -> None:
    header.setdefault("t", tag)
    _decodes_or_refuses([msgpack.packb(header), *([b"\1" * TAG_BYTES] if has_tag else []), *payload])


@FUZZ
@given(frames=st.lists(st.binary(max_size=256), max_size=5))
def test_raw_bytes(frames: list[bytes]) -> None:
    _decodes_or_refuses(frames)


specs = st.builds(
    KVSpec,
    num_layers=st.integers(1, 64),
    kv_lora_rank=st.sampled_from([16, 32, 512]),
    rope_dim=st.sampled_from([8, 64]),
    dtype=st.sampled_from(["bfloat16", "float16", "float32", "float8_e4m3fn"]),
    fingerprint=st.text(max_size=32),
)


@st.composite
def messages(draw: st.DrawFn) -> Register | LayerKV | Done | Abort:
    room = draw(st.integers(0, 2**63 - 1))
    kind = draw(st.sampled_from(["register", "layer", "done", "abort"]))
    if kind == "register":
        tp = draw(st.sampled_from([1, 2, 4]))
        layout = DecodeLayout(kv=draw(specs), tp_size=tp, latent_groups=draw(st.sampled_from([1, tp])),
                              page_size=draw(st.sampled_from([1, 16, 64])))
        endpoints = tuple(f"tcp://10.0.0.{i}:{5000 + i}" for i in range(tp))
        return Register(room, layout, endpoints, endpoints[0], draw(st.integers(1, 1 << 24)),
                        draw(st.integers(1, 1 << 40)), draw(st.integers(0, 2**63 - 1)),
                        draw(st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES)))
    if kind == "layer":
        n = draw(st.integers(1, 4))
        ckv, kpe = torch.zeros(n, draw(st.sampled_from([8, 16])), dtype=torch.bfloat16), torch.ones(n, 8)
        return LayerKV(room, draw(st.integers(0, 127)), draw(st.integers(0, 1 << 20)), n, tensor_frame(ckv),
                       tensor_frame(kpe))
    if kind == "done":
        m, k = draw(st.integers(0, 3)), draw(st.integers(0, 2))
        lp = PromptLogprobs(draw(st.integers(0, 100)), torch.zeros(m), torch.zeros(m, k) if k else None,
                            torch.zeros(m, k, dtype=torch.int32) if k else None)
        top = TopLogprobs(torch.zeros(k + 1), torch.zeros(k + 1, dtype=torch.int32))
        return Done(room, draw(st.integers(0, 2**31 - 1)), draw(st.none() | st.floats(-100, 0)),
                    draw(st.none() | st.just(lp)), draw(st.booleans()), draw(st.none() | st.just(top)))
    return Abort(room, draw(st.text(max_size=64)))


def _bytes(frames: list) -> list[bytes]:
    return [bytes(memoryview(f)) for f in frames]


@FUZZ
@given(msg=messages())
def test_valid_messages_round_trip(msg: Register | LayerKV | Done | Abort) -> None:
    got = decode(_bytes(encode(msg, KEY)))
    if isinstance(msg, LayerKV):
        assert isinstance(got, LayerKV) and bytes(got.ckv) == bytes(memoryview(msg.ckv))
        assert (got.room, got.layer, got.token_start, got.n_tokens) == (msg.room, msg.layer, msg.token_start,
                                                                        msg.n_tokens)
    elif isinstance(msg, Done) and (msg.prompt_logprobs is not None or msg.first_token_top is not None):
        assert isinstance(got, Done) and (got.room, got.first_token_id) == (msg.room, msg.first_token_id)
        if msg.prompt_logprobs is not None:
            assert got.prompt_logprobs is not None
            assert torch.equal(got.prompt_logprobs.logprobs, msg.prompt_logprobs.logprobs)
        if msg.first_token_top is not None:
            assert got.first_token_top is not None
            assert torch.equal(got.first_token_top.ids, msg.first_token_top.ids)
    else:
        assert got == msg


@FUZZ
@given(msg=messages(), data=st.data())
def test_valid_messages_mutated_field_by_field(msg: Register | LayerKV | Done | Abort, data: st.DataObject) -> None:
    frames = _bytes(encode(msg, KEY))
    header = msgpack.unpackb(frames[0])
    key = data.draw(st.sampled_from(sorted(header)))
    target = header
    if isinstance(header[key], dict) and header[key] and data.draw(st.booleans()):
        target = header[key]  # one level down: a REGISTER's layout, a DONE's prompt_logprobs
        key = data.draw(st.sampled_from(sorted(target)))
    if data.draw(st.booleans()):
        target[key] = data.draw(values)
    else:
        del target[key]
    _decodes_or_refuses([msgpack.packb(header), *frames[1:]])


@FUZZ
@given(msg=messages(), data=st.data())
def test_valid_messages_mutated_byte_by_byte(msg: Register | LayerKV | Done | Abort, data: st.DataObject) -> None:
    frames = _bytes(encode(msg, KEY))
    header = bytearray(frames[0])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(header) - 1))
        header[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(header)))
    mutated = [bytes(header[:cut]) + data.draw(st.binary(max_size=8)), *frames[1:]]
    if data.draw(st.booleans()):  # and the frames around the header: one dropped, added or resized
        at = data.draw(st.integers(0, len(mutated)))
        mutated[at:at + 1] = data.draw(st.lists(st.binary(max_size=64), max_size=2))
    _decodes_or_refuses(mutated)
