"""Prefill → decode latent-KV transport: REGISTER over ZMQ, the per-layer stream and DONE over the KV data
plane (DESIGN §4, §8).

Prefill: one KVSender per scheduler. Decode: one KVReceiver per TP rank; rank 0 also registers rooms.
"""

from tpla_serve.disagg.bootstrap import bootstrap_endpoint, check_endpoint, check_room, tcp_endpoint
from tpla_serve.disagg.events import RoomCompleted, RoomEvent, RoomFailed
from tpla_serve.disagg.messages import (
    PROTOCOL_VERSION,
    Abort,
    Done,
    LayerKV,
    PromptLogprobs,
    ProtocolError,
    Register,
    TopLogprobs,
    decode,
    encode,
)
from tpla_serve.disagg.receiver import KVReceiver, KVWriter, ReceiverStats
from tpla_serve.disagg.sender import KVSender
from tpla_serve.disagg.sender_rooms import SenderStats
from tpla_serve.disagg.handshake import (
    KV_DTYPES,
    DecodeLayout,
    KVSpec,
    draft_mismatch,
    dtype_name,
    layout_mismatch,
)

__all__ = [
    "KV_DTYPES",
    "PROTOCOL_VERSION",
    "Abort",
    "DecodeLayout",
    "Done",
    "KVReceiver",
    "KVSender",
    "KVSpec",
    "KVWriter",
    "LayerKV",
    "PromptLogprobs",
    "ProtocolError",
    "ReceiverStats",
    "Register",
    "RoomCompleted",
    "RoomEvent",
    "RoomFailed",
    "SenderStats",
    "TopLogprobs",
    "bootstrap_endpoint",
    "check_endpoint",
    "check_room",
    "decode",
    "draft_mismatch",
    "dtype_name",
    "encode",
    "layout_mismatch",
    "tcp_endpoint",
]
