"""Wire messages of the prefill → decode KV stream.

Each message is one multipart ZMQ message: frame 0 is a msgpack map {"v": version, "t": tag, fields...},
frame 1 the header's 16-byte tag (auth.py), any further frames raw little-endian tensor bytes (never
pickle). Decoding is strict and bounded: an unknown version or tag, a missing, extra or mistyped field,
an out-of-range value, a wrong frame count or size all raise ProtocolError (a ValueError), so an IO loop
can drop the message and carry on. Decoding does not check the tag: the transport does, with the key of
the message's kind and room.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgpack
import torch

from tpla_serve.disagg.auth import NONCE_BYTES, TAG_BYTES, make_tag
from tpla_serve.disagg.bootstrap import MAX_ROOM, check_endpoint
from tpla_serve.disagg.handshake import DecodeLayout, KVSpec
from tpla_serve.disagg.logprob_frames import PromptLogprobs, TopLogprobs
from tpla_serve.disagg.wire import Frame, HeaderFields, ProtocolError, frame_tensor, tensor_frame

PROTOCOL_VERSION = 5  # 5: rank endpoints speak the data plane's stream (DESIGN §8); REGISTER names lanes
MAX_HEADER_BYTES = 64 * 1024
MAX_MESSAGE_LEN = 4096
MAX_TOKENS = 1 << 24
MAX_TOP_LOGPROBS = 1024
MAX_RANKS = 1024
MAX_LANES = 8
MAX_BATCH_LAYERS = 32  # layers in one LAYER_KV
MAX_LAYERS = 1 << 16  # per model: a layer index on the wire is below 2 * MAX_LAYERS (target + draft)
_UNPACK_LIMITS = {
    "max_str_len": MAX_MESSAGE_LEN,
    "max_bin_len": NONCE_BYTES,
    "max_array_len": MAX_RANKS,
    "max_map_len": 32,
    "max_ext_len": 0,
}

class Tag(enum.IntEnum):
    REGISTER = 1
    LAYER_KV = 2
    DONE = 3
    ABORT = 4


@dataclass(frozen=True)
class Register:
    """Decode rank 0 → prefill bootstrap: "send room's KV, sliced for this layout, to these endpoints"."""

    room: int
    layout: DecodeLayout
    rank_endpoints: tuple[str, ...]  # rank k's PULL endpoint receives rank k's slice
    notify_endpoint: str  # also gets every ABORT for the room (rank 0's endpoint unless the decode says)
    n_tokens: int  # prompt tokens the decode expects (and reserved pages for)
    max_frame_bytes: int  # largest frame the decode ranks accept; the prefill chunks tokens to fit
    issued_ms: int  # the decode's wall clock when it sent the REGISTER (ms since the epoch)
    nonce: bytes  # random, once per REGISTER: the prefill refuses a REGISTER it has seen
    lanes: int = 1  # connections per decode rank the prefill spreads layers over (DESIGN §4)

    def __post_init__(self) -> None:
        if len(self.rank_endpoints) != self.layout.tp_size:
            raise ValueError(
                f"rank_endpoints has {len(self.rank_endpoints)} entries for tp_size {self.layout.tp_size}"
            )
        if type(self.nonce) is not bytes or len(self.nonce) != NONCE_BYTES:
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes")


@dataclass(frozen=True)
class LayerKV:
    """Prefill → one decode rank: tokens [token_start, token_start + n_tokens) of layers [layer, layer +
    n_layers), as that rank keeps them. Frames: per layer ĉ slice [n_tokens, r/g] and k_pe [n_tokens, d_r],
    raw bytes of the KV dtype (the first layer's in ckv and kpe, the others' in `more`). Small layers ready
    together travel in one message.

    `layer` < kv.num_layers is the target's layer; kv.num_layers + i is the draft's layer i, whose ĉ is
    the draft's whole latent (the draft is not sharded) and which only a rank that keeps a draft gets.
    """

    room: int
    layer: int
    token_start: int
    n_tokens: int
    ckv: Frame
    kpe: Frame
    n_layers: int = 1
    more: tuple[Frame, ...] = ()  # ĉ, k_pe of layer + 1, then of layer + 2, ...

    def __post_init__(self) -> None:
        if len(self.more) != 2 * (self.n_layers - 1):
            raise ValueError(f"{self.n_layers} layers carry {2 * self.n_layers} frames, not "
                             f"{2 + len(self.more)}")

    def tensors(self, dtype: torch.dtype, ckv_width: int, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.n_tokens,)
        return (
            frame_tensor(memoryview(self.ckv), dtype, shape + (ckv_width,), "ckv"),
            frame_tensor(memoryview(self.kpe), dtype, shape + (rope_dim,), "kpe"),
        )


@dataclass(frozen=True)
class Done:
    """Prefill → every decode rank, after all of the room's layers: the first sampled token.
    Logprobs (the prompt's, the first token's top-k) go to rank 0 only. draft_kv: every draft layer was
    sent to this rank (False when the rank keeps no draft, or the prefill cannot provide the draft KV the
    decode asked for)."""

    room: int
    first_token_id: int
    first_token_logprob: float | None = None
    prompt_logprobs: PromptLogprobs | None = None
    draft_kv: bool = False
    first_token_top: TopLogprobs | None = None


@dataclass(frozen=True)
class Abort:
    """Either direction: the room is over; `message` says why."""

    room: int
    message: str


Message = Register | LayerKV | Done | Abort


# ---------------------------------------------------------------- encoding


def _spec_map(spec: KVSpec) -> dict[str, Any]:
    return {
        "num_layers": spec.num_layers,
        "kv_lora_rank": spec.kv_lora_rank,
        "rope_dim": spec.rope_dim,
        "dtype": spec.dtype,
        "fingerprint": spec.fingerprint,
    }


def _signed(tag: Tag, fields: dict[str, Any], key: bytes, payload: list[Frame] | None = None) -> list[Frame]:
    header = msgpack.packb({"v": PROTOCOL_VERSION, "t": int(tag), **fields})
    return [header, make_tag(key, header), *(payload or ())]


def encode(msg: Message, key: bytes) -> list[Frame]:
    """The frames of `msg`: a msgpack header, its tag under `key`, then its raw tensor frames (referenced,
    not copied). `key`: the cluster's register key for a REGISTER, else the room's key for the direction."""
    if isinstance(msg, LayerKV):
        fields = {
            "room": msg.room,
            "layer": msg.layer,
            "token_start": msg.token_start,
            "n_tokens": msg.n_tokens,
            "n_layers": msg.n_layers,
        }
        return _signed(Tag.LAYER_KV, fields, key, [msg.ckv, msg.kpe, *msg.more])
    if isinstance(msg, Done):
        lp, top = msg.prompt_logprobs, msg.first_token_top
        lp_fields = None if lp is None else {"start": lp.start, "n": lp.logprobs.shape[0], "k": lp.top_k}
        fields = {
            "room": msg.room,
            "first_token_id": msg.first_token_id,
            "first_token_logprob": msg.first_token_logprob,
            "first_token_top_k": 0 if top is None else top.logprobs.shape[0],
            "prompt_logprobs": lp_fields,
            "draft_kv": msg.draft_kv,
        }
        payload: list[Frame] = []
        if lp is not None:
            payload.append(tensor_frame(lp.logprobs.contiguous()))
            if lp.top_logprobs is not None and lp.top_ids is not None:
                payload += [tensor_frame(lp.top_logprobs.contiguous()), tensor_frame(lp.top_ids.contiguous())]
        if top is not None:
            payload += [tensor_frame(top.logprobs.contiguous()), tensor_frame(top.ids.contiguous())]
        return _signed(Tag.DONE, fields, key, payload)
    if isinstance(msg, Register):
        layout = msg.layout
        fields = {
            "room": msg.room,
            "layout": {
                "tp_size": layout.tp_size,
                "latent_groups": layout.latent_groups,
                "page_size": layout.page_size,
                "kv": _spec_map(layout.kv),
                "draft": None if layout.draft is None else _spec_map(layout.draft),
                "draft_ranks": list(layout.draft_ranks),
            },
            "rank_endpoints": list(msg.rank_endpoints),
            "notify_endpoint": msg.notify_endpoint,
            "n_tokens": msg.n_tokens,
            "max_frame_bytes": msg.max_frame_bytes,
            "issued_ms": msg.issued_ms,
            "nonce": msg.nonce,
            "lanes": msg.lanes,
        }
        return _signed(Tag.REGISTER, fields, key)
    if isinstance(msg, Abort):
        return _signed(Tag.ABORT, {"room": msg.room, "message": msg.message[:MAX_MESSAGE_LEN]}, key)
    raise TypeError(f"not a message: {type(msg).__name__}")


# ---------------------------------------------------------------- strict decoding


_SPEC_KEYS = frozenset({"num_layers", "kv_lora_rank", "rope_dim", "dtype", "fingerprint"})
_LAYOUT_KEYS = frozenset({"tp_size", "latent_groups", "page_size", "kv", "draft", "draft_ranks"})


def _spec(obj: object, where: str) -> KVSpec:
    f = HeaderFields(obj, _SPEC_KEYS, where)
    return KVSpec(
        num_layers=f.int("num_layers", 1, MAX_LAYERS),
        kv_lora_rank=f.int("kv_lora_rank", 1, 1 << 16),
        rope_dim=f.int("rope_dim", 1, 1 << 16),
        dtype=f.str("dtype"),
        fingerprint=f.str("fingerprint"),
    )


def _register(f: HeaderFields, frames: Sequence[memoryview]) -> Register:
    lf = HeaderFields(f.get("layout"), _LAYOUT_KEYS, "register.layout")
    draft = lf.get("draft")
    layout = DecodeLayout(
        kv=_spec(lf.get("kv"), "register.layout.kv"),
        tp_size=lf.int("tp_size", 1, MAX_RANKS),
        latent_groups=lf.int("latent_groups", 1, MAX_RANKS),
        page_size=lf.int("page_size", 1, 1 << 20),
        draft=None if draft is None else _spec(draft, "register.layout.draft"),
        draft_ranks=tuple(lf.int_list("draft_ranks", 0, MAX_RANKS - 1)),
    )
    return Register(
        room=f.int("room"),
        layout=layout,
        rank_endpoints=tuple(check_endpoint(e) for e in f.str_list("rank_endpoints")),
        notify_endpoint=check_endpoint(f.str("notify_endpoint")),
        n_tokens=f.int("n_tokens", 1, MAX_TOKENS),
        max_frame_bytes=f.int("max_frame_bytes", 1, 1 << 40),
        issued_ms=f.int("issued_ms"),
        nonce=f.bytes("nonce", NONCE_BYTES),
        lanes=f.int("lanes", 1, MAX_LANES),
    )


def _layer_kv(f: HeaderFields, frames: Sequence[memoryview]) -> LayerKV:
    n_layers = f.int("n_layers", 1, MAX_BATCH_LAYERS)
    if len(frames) != 2 * n_layers:
        raise ProtocolError(
            f"LAYER_KV of {n_layers} layers carries {len(frames)} frames, expected {2 * n_layers}"
        )
    return LayerKV(
        room=f.int("room"),
        layer=f.int("layer", 0, 2 * MAX_LAYERS - 1),
        token_start=f.int("token_start", 0, MAX_TOKENS),
        n_tokens=f.int("n_tokens", 1, MAX_TOKENS),
        ckv=frames[0],
        kpe=frames[1],
        n_layers=n_layers,
        more=tuple(frames[2:]),
    )


def _done(f: HeaderFields, frames: Sequence[memoryview]) -> Done:
    """Frames: the prompt logprobs' (1, or 3 with top-k), then the first token's top-k (2) when k > 0."""
    top_k = f.int("first_token_top_k", 0, MAX_TOP_LOGPROBS)
    first_token_top = None
    if top_k:
        if len(frames) < 2:
            raise ProtocolError(f"done with the first token's top-{top_k} carries {len(frames)} frames")
        first_token_top = TopLogprobs(
            frame_tensor(frames[-2], torch.float32, (top_k,), "first token top logprobs"),
            frame_tensor(frames[-1], torch.int32, (top_k,), "first token top ids"),
        )
        frames = frames[:-2]
    lp_obj = f.get("prompt_logprobs")
    prompt_logprobs = None
    if lp_obj is None:
        if frames:
            raise ProtocolError(f"done without prompt_logprobs carries {len(frames)} frames")
    else:
        lf = HeaderFields(lp_obj, frozenset({"start", "n", "k"}), "done.prompt_logprobs")
        start, m, k = (
            lf.int("start", 0, MAX_TOKENS),
            lf.int("n", 0, MAX_TOKENS),
            lf.int("k", 0, MAX_TOP_LOGPROBS),
        )
        if len(frames) != (3 if k else 1):
            raise ProtocolError(f"done with top-{k} prompt logprobs carries {len(frames)} frames")
        prompt_logprobs = PromptLogprobs(
            start=start,
            logprobs=frame_tensor(frames[0], torch.float32, (m,), "prompt logprobs"),
            top_logprobs=frame_tensor(frames[1], torch.float32, (m, k), "top logprobs") if k else None,
            top_ids=frame_tensor(frames[2], torch.int32, (m, k), "top ids") if k else None,
        )
    return Done(
        room=f.int("room"),
        first_token_id=f.int("first_token_id", 0, (1 << 31) - 1),
        first_token_logprob=f.opt_float("first_token_logprob"),
        prompt_logprobs=prompt_logprobs,
        draft_kv=f.bool("draft_kv"),
        first_token_top=first_token_top,
    )


def _abort(f: HeaderFields, frames: Sequence[memoryview]) -> Abort:
    return Abort(room=f.int("room"), message=f.str("message"))


@dataclass(frozen=True)
class _Kind:
    keys: frozenset[str]
    n_frames: int | None  # None: the decoder checks
    build: Callable[[HeaderFields, Sequence[memoryview]], Message]


_KINDS = MappingProxyType(
    {
        Tag.REGISTER: _Kind(
            frozenset(
                {"room", "layout", "rank_endpoints", "notify_endpoint", "n_tokens", "max_frame_bytes"}
                | {"issued_ms", "nonce", "lanes"}
            ),
            0,
            _register,
        ),
        Tag.LAYER_KV: _Kind(
            frozenset({"room", "layer", "token_start", "n_tokens", "n_layers"}), None, _layer_kv
        ),
        Tag.DONE: _Kind(
            frozenset({"room", "first_token_id", "first_token_logprob", "first_token_top_k", "prompt_logprobs"}
                      | {"draft_kv"}),
            None,
            _done,
        ),
        Tag.ABORT: _Kind(frozenset({"room", "message"}), 0, _abort),
    }
)


def _header(view: memoryview) -> dict:
    if view.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {view.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(view, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack signals bad input with many exception types
        raise ProtocolError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    if header.get("v") != PROTOCOL_VERSION or type(header.get("v")) is not int:
        raise ProtocolError(f"unsupported protocol version {header.get('v')!r:.40} (want {PROTOCOL_VERSION})")
    tag = header.get("t")
    if type(tag) is not int or tag not in _KINDS:
        raise ProtocolError(f"unknown message tag {tag!r:.40}")
    return header


def peek(header: Any) -> tuple[Tag, int]:
    """The kind and room of a message from its header alone, so a receiver can check its tag and decide
    where the payload goes before reading it (ProtocolError when the header is not one of ours)."""
    fields = _header(memoryview(header))
    room = fields.get("room")
    if type(room) is not int or not 0 <= room <= MAX_ROOM:
        raise ProtocolError(f"room must be an int in [0, {MAX_ROOM}], got {room!r:.40}")
    return Tag(fields["t"]), room


def decode(frames: Sequence[Any]) -> Message:
    """The message in `frames` (bytes or zmq.Frame); ProtocolError for anything malformed. The tag (frame 1)
    is checked for its size only: see auth.signed_by."""
    if not frames:
        raise ProtocolError("empty message")
    views = [memoryview(f) for f in frames]
    header = _header(views[0])
    tag = header["t"]
    kind = _KINDS[Tag(tag)]
    if len(views) < 2 or views[1].nbytes != TAG_BYTES:
        raise ProtocolError(f"{Tag(tag).name} has no {TAG_BYTES}-byte tag in frame 1")
    body = {k: v for k, v in header.items() if k not in ("v", "t")}
    payload = views[2:]
    if kind.n_frames is not None and len(payload) != kind.n_frames:
        raise ProtocolError(f"{Tag(tag).name} carries {len(payload)} frames, expected {kind.n_frames}")
    fields = HeaderFields(body, kind.keys, Tag(tag).name.lower())
    try:
        return kind.build(fields, payload)
    except ProtocolError:
        raise
    except ValueError as exc:  # a well-typed but inconsistent value, e.g. g not dividing tp_size
        raise ProtocolError(f"{Tag(tag).name.lower()}: {exc}") from exc
