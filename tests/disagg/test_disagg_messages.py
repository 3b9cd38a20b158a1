"""Wire format: round trips, and strict, bounded rejection of everything else (tags: test_kv_auth.py)."""

from __future__ import annotations

import msgpack
import pytest
import torch

from tpla_serve.disagg import (
    PROTOCOL_VERSION,
    Abort,
    DecodeLayout,
    Done,
    KVSpec,
    LayerKV,
    PromptLogprobs,
    ProtocolError,
    Register,
    TopLogprobs,
    bootstrap_endpoint,
    check_endpoint,
    decode,
    draft_mismatch,
    encode,
    layout_mismatch,
)
from tpla_serve.disagg.auth import NONCE_BYTES, TAG_BYTES, signed_by
from tpla_serve.disagg.messages import tensor_frame

SPEC = KVSpec(
    num_layers=27, kv_lora_rank=512, rope_dim=64, dtype="bfloat16", fingerprint="deepseek-v2-lite/pca"
)
LAYOUT = DecodeLayout(kv=SPEC, tp_size=2, latent_groups=2, page_size=64, draft=SPEC, draft_ranks=(0, 1))
ROOM = 2**63 - 1
KEY = bytes(range(32))
NO_TAG = b"\0" * TAG_BYTES  # the decoder checks a tag's size; the transports check its value


def _register(**overrides: object) -> Register:
    fields: dict = {
        "room": ROOM,
        "layout": LAYOUT,
        "rank_endpoints": ("tcp://10.0.0.2:5000", "tcp://[::1]:5001"),
        "notify_endpoint": "tcp://10.0.0.2:5000",
        "n_tokens": 8192,
        "max_frame_bytes": 1 << 26,
        "issued_ms": 1_796_000_000_000,
        "nonce": b"\x07" * NONCE_BYTES,
    }
    fields.update(overrides)
    return Register(**fields)


def _bytes(frames: list) -> list[bytes]:
    return [bytes(memoryview(f)) for f in frames]


def _header(frames: list) -> dict:
    return msgpack.unpackb(frames[0])


def _with_header(header: dict, payload: list[bytes] = ()) -> list[bytes]:
    return [msgpack.packb(header), NO_TAG, *payload]


def test_register_round_trip() -> None:
    reg = _register()
    frames = _bytes(encode(reg, KEY))
    assert decode(frames) == reg and signed_by(KEY, frames)
    no_draft = _register(layout=DecodeLayout(kv=SPEC, tp_size=2, latent_groups=1, page_size=1))
    assert decode(_bytes(encode(no_draft, KEY))) == no_draft


def test_the_tag_signs_the_header_under_its_key_only() -> None:
    frames = _bytes(encode(Abort(room=3, message="why"), KEY))
    assert len(frames) == 2 and len(frames[1]) == TAG_BYTES and signed_by(KEY, frames)
    assert not signed_by(bytes(32), frames)
    tampered = msgpack.packb({**_header(frames), "room": 4})
    assert not signed_by(KEY, [tampered, frames[1]])
    with pytest.raises(ValueError, match="nonce"):
        _register(nonce=b"short")


def test_layer_kv_round_trip_is_bitwise() -> None:
    ckv = torch.randn(5, 256).bfloat16()
    kpe = torch.randn(5, 64).bfloat16()
    frames = encode(
        LayerKV(room=3, layer=26, token_start=100, n_tokens=5, ckv=tensor_frame(ckv), kpe=tensor_frame(kpe)), KEY
    )
    msg = decode(_bytes(frames))
    assert isinstance(msg, LayerKV) and (msg.room, msg.layer, msg.token_start, msg.n_tokens) == (
        3,
        26,
        100,
        5,
    )
    got_ckv, got_kpe = msg.tensors(torch.bfloat16, 256, 64)
    assert torch.equal(got_ckv, ckv) and torch.equal(got_kpe, kpe)
    with pytest.raises(ProtocolError, match="ckv frame"):
        msg.tensors(torch.bfloat16, 512, 64)
    with pytest.raises(ProtocolError, match="kpe frame"):
        msg.tensors(torch.bfloat16, 256, 32)


def test_done_and_abort_round_trip() -> None:
    lp = PromptLogprobs(
        start=1,
        logprobs=torch.randn(7),
        top_logprobs=torch.randn(7, 3),
        top_ids=torch.randint(0, 100, (7, 3), dtype=torch.int32),
    )
    msg = decode(
        _bytes(encode(Done(room=9, first_token_id=42, first_token_logprob=-1.25, prompt_logprobs=lp), KEY))
    )
    assert isinstance(msg, Done) and (msg.room, msg.first_token_id, msg.first_token_logprob) == (9, 42, -1.25)
    assert msg.prompt_logprobs is not None and msg.prompt_logprobs.start == 1
    assert torch.equal(msg.prompt_logprobs.logprobs, lp.logprobs)
    assert torch.equal(msg.prompt_logprobs.top_logprobs, lp.top_logprobs)
    assert torch.equal(msg.prompt_logprobs.top_ids, lp.top_ids)
    plain = decode(_bytes(encode(Done(room=9, first_token_id=0), KEY)))
    assert plain == Done(room=9, first_token_id=0, first_token_logprob=None, prompt_logprobs=None, draft_kv=False)
    assert decode(_bytes(encode(Done(room=9, first_token_id=0, draft_kv=True), KEY))).draft_kv is True
    top = TopLogprobs(torch.tensor([-0.1, -2.5]), torch.tensor([42, 7], dtype=torch.int32))
    for prompt in (None, lp):  # the first token's top-k frames follow the prompt's, if any
        done = Done(room=9, first_token_id=42, prompt_logprobs=prompt, first_token_top=top)
        got = decode(_bytes(encode(done, KEY)))
        assert isinstance(got, Done) and got.first_token_top is not None
        assert torch.equal(got.first_token_top.logprobs, top.logprobs)
        assert torch.equal(got.first_token_top.ids, top.ids)
        assert (got.prompt_logprobs is None) == (prompt is None)
    assert decode(_bytes(encode(Abort(room=0, message="why"), KEY))) == Abort(room=0, message="why")


def _done_header() -> dict:
    return _header(encode(Done(room=1, first_token_id=2, first_token_logprob=-0.5), KEY))


@pytest.mark.parametrize(
    "frames, match",
    [
        ([], "empty"),
        ([b"\xc1garbage"], "not valid msgpack"),
        ([msgpack.packb([1, 2, 3])], "must be a map"),
        ([msgpack.packb({"v": PROTOCOL_VERSION + 1, "t": 4, "room": 1, "message": ""})], "version"),
        ([msgpack.packb({"v": True, "t": 4, "room": 1, "message": ""})], "version"),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": 99, "room": 1, "message": ""})], "unknown message tag"),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": "4", "room": 1, "message": ""})], "unknown message tag"),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": 4, "room": 1})], "missing fields \\['message'\\]"),
        (
            [msgpack.packb({"v": PROTOCOL_VERSION, "t": 4, "room": 1, "message": "", "x": 0})],
            "unexpected \\['x'\\]",
        ),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": 4, "room": "1", "message": ""})], "abort.room"),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": 4, "room": True, "message": ""})], "abort.room"),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": 4, "room": -1, "message": ""})], "abort.room"),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": 4, "room": 2**63, "message": ""})], "abort.room"),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": 4, "room": 1, "message": 5})], "abort.message"),
        (
            [msgpack.packb({"v": PROTOCOL_VERSION, "t": 4, "room": 1, "message": ""}), b"extra"],
            "carries 1 frames",
        ),
        (
            [
                msgpack.packb(
                    {"v": PROTOCOL_VERSION, "t": 2, "room": 1, "layer": 0, "token_start": 0, "n_tokens": 1,
                     "n_layers": 1}
                )
            ],
            "carries 0 frames",
        ),
        (
            [
                msgpack.packb(
                    {
                        "v": PROTOCOL_VERSION,
                        "t": 2,
                        "room": 1,
                        "layer": 0,
                        "token_start": 0,
                        "n_tokens": 2**40,
                        "n_layers": 1,
                    }
                ),
                b"",
                b"",
            ],
            "layer_kv.n_tokens",
        ),
        (
            [
                msgpack.packb(
                    {"v": PROTOCOL_VERSION, "t": 2, "room": 1, "layer": 2**17, "token_start": 0,
                     "n_tokens": 1,
                     "n_layers": 1}
                ),
                b"",
                b"",
            ],
            "layer_kv.layer",  # past the last draft layer any pair of models can have
        ),
        ([msgpack.packb({**_done_header(), "first_token_logprob": "x"})], "first_token_logprob"),
        ([msgpack.packb({**_done_header(), "draft_kv": 1})], "done.draft_kv must be a bool"),
        ([msgpack.packb({k: v for k, v in _done_header().items() if k != "draft_kv"})], "missing fields"),
        ([msgpack.packb(_done_header()), b"\0" * 4], "without prompt_logprobs"),
        (
            [msgpack.packb({**_done_header(), "prompt_logprobs": {"start": 0, "n": 3, "k": 0}}), b"\0" * 8],
            "prompt logprobs frame",
        ),
        (
            [msgpack.packb({**_done_header(), "prompt_logprobs": {"start": 0, "n": 2**30, "k": 0}}), b""],
            "prompt_logprobs.n",
        ),
        ([b"\x81" + b"\xa1a" + b"\x00" * 10], "not valid msgpack"),  # trailing bytes
        ([b"\xdd\xff\xff\xff\xff"], "not valid msgpack"),  # declares a 4-billion-entry array
        ([b"\xdb\x7f\xff\xff\xff"], "not valid msgpack"),  # declares a 2 GiB string
        ([b"\x80" * (70 * 1024)], "header of"),
        ([msgpack.packb({**_done_header(), "x": b"\0" * (NONCE_BYTES + 1)})], "not valid msgpack"),  # bin cap
    ],
)
def test_malformed_messages_raise_protocol_error(frames: list[bytes], match: str) -> None:
    """Frame 0 as given, then a tag-sized frame 1, then the rest."""
    with pytest.raises(ProtocolError, match=match):
        decode(frames[:1] + [NO_TAG] + frames[1:] if frames else frames)


@pytest.mark.parametrize("tag", [None, b"", b"\0" * (TAG_BYTES - 1), b"\0" * (TAG_BYTES + 1)])
def test_a_message_without_a_tag_sized_frame_1_is_malformed(tag: bytes | None) -> None:
    header = encode(Abort(room=1, message=""), KEY)[0]
    with pytest.raises(ProtocolError, match="ABORT has no 16-byte tag in frame 1"):
        decode([header] if tag is None else [header, tag])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h: h["layout"].update(latent_groups=3), "tpla_groups"),  # g must divide T
        (lambda h: h["layout"]["kv"].update(dtype="int4"), "dtype"),
        (lambda h: h["layout"]["kv"].pop("rope_dim"), "missing fields \\['rope_dim'\\]"),
        (lambda h: h["layout"].update(draft=[1]), "layout.draft must be a map"),
        (lambda h: h["layout"].update(draft_ranks=[0, 2]), "draft_ranks must be increasing ranks in \\[0, 2\\)"),
        (lambda h: h["layout"].update(draft_ranks=[1, 0]), "draft_ranks must be increasing"),
        (lambda h: h["layout"].update(draft_ranks=[]), "draft_ranks must name at least one rank"),
        (lambda h: h["layout"].update(draft_ranks=[-1]), "layout.draft_ranks must be a list of ints"),
        (lambda h: h["layout"].update(draft_ranks=["0"]), "layout.draft_ranks must be a list of ints"),
        (lambda h: h["layout"].update(draft_ranks=0), "layout.draft_ranks must be a list of ints"),
        (lambda h: h["layout"].pop("draft_ranks"), "missing fields \\['draft_ranks'\\]"),
        (lambda h: h.update(rank_endpoints=["tcp://a:1"]), "rank_endpoints has 1 entries"),
        (lambda h: h.update(rank_endpoints=["tcp://*:1", "tcp://a:2"]), "not tcp://host:port"),
        (lambda h: h.update(notify_endpoint="inproc://x"), "not tcp://host:port"),
        (lambda h: h.update(n_tokens=0), "register.n_tokens"),
        (lambda h: h.update(rank_endpoints="tcp://a:1"), "list of str"),
        (lambda h: h.update(nonce=b"\0" * (NONCE_BYTES - 1)), "register.nonce must be 16 bytes"),
        (lambda h: h.update(nonce="x" * NONCE_BYTES), "register.nonce must be 16 bytes"),
        (lambda h: h.pop("issued_ms"), "missing fields \\['issued_ms'\\]"),
        (lambda h: h.update(issued_ms=-1), "register.issued_ms"),
    ],
)
def test_register_field_validation(mutate, match: str) -> None:
    header = _header(encode(_register(), KEY))
    mutate(header)
    with pytest.raises(ProtocolError, match=match):
        decode(_with_header(header))


def test_layout_mismatch_names_the_field() -> None:
    assert layout_mismatch(SPEC, LAYOUT) is None
    other = KVSpec(num_layers=27, kv_lora_rank=512, rope_dim=64, dtype="bfloat16", fingerprint="other")
    assert "fingerprint" in layout_mismatch(other, LAYOUT)
    fp16 = KVSpec(num_layers=27, kv_lora_rank=512, rope_dim=64, dtype="float16", fingerprint=SPEC.fingerprint)
    assert "dtype" in layout_mismatch(fp16, LAYOUT)
    # The draft never fails a room: it only decides whether the draft's KV goes along.
    assert draft_mismatch(SPEC, LAYOUT) is None
    assert "no draft model" in draft_mismatch(None, LAYOUT)
    assert "draft model fingerprint" in draft_mismatch(other, LAYOUT)
    no_draft = DecodeLayout(kv=SPEC, tp_size=2, latent_groups=2, page_size=64)
    assert draft_mismatch(None, no_draft) is None and draft_mismatch(other, no_draft) is None


def test_draft_ranks_are_validated() -> None:
    assert LAYOUT.num_wire_layers(0) == LAYOUT.num_wire_layers(1) == 2 * SPEC.num_layers
    rank0 = DecodeLayout(kv=SPEC, tp_size=2, latent_groups=2, page_size=64, draft=SPEC, draft_ranks=(0,))
    assert rank0.wants_draft(0) and not rank0.wants_draft(1) and rank0.num_wire_layers(1) == SPEC.num_layers
    for draft, ranks in ((SPEC, ()), (None, (0,)), (SPEC, (2,)), (SPEC, (1, 0)), (SPEC, (0, 0)), (SPEC, (-1,))):
        with pytest.raises(ValueError, match="draft_ranks"):
            DecodeLayout(kv=SPEC, tp_size=2, latent_groups=2, page_size=64, draft=draft, draft_ranks=ranks)


def test_endpoints_and_bootstrap_port_default() -> None:
    assert bootstrap_endpoint("10.1.2.3", None, 8998) == "tcp://10.1.2.3:8998"
    assert bootstrap_endpoint("10.1.2.3", 9000, 8998) == "tcp://10.1.2.3:9000"
    assert bootstrap_endpoint("::1", 9000, None) == "tcp://[::1]:9000"
    with pytest.raises(ValueError, match="no default bootstrap port"):
        bootstrap_endpoint("h", None, None)
    with pytest.raises(ValueError, match="port"):
        bootstrap_endpoint("h", 70000, None)
    assert check_endpoint("ipc:///tmp/x") == "ipc:///tmp/x"
    for bad in ("tcp://h:0", "tcp://h", "udp://h:1", "tcp://h:1; rm", "x" * 300):
        with pytest.raises(ValueError):
            check_endpoint(bad)
