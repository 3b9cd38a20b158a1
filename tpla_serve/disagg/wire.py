"""The strict parts of the KV stream's wire format: tensor frames and typed header fields.

A header field of the wrong type or range, a header with missing or unexpected keys, a tensor frame of the
wrong size: each raises ProtocolError (a ValueError), so an IO loop can drop the message and carry on.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tpla_serve.disagg.bootstrap import MAX_ROOM

Frame = bytes | memoryview | np.ndarray


class ProtocolError(ValueError):
    """A peer sent something that is not a valid message of this protocol version."""


def tensor_frame(t: torch.Tensor) -> np.ndarray:
    """A zero-copy byte view of a contiguous CPU tensor; it keeps the tensor alive while ZMQ holds it."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"a wire tensor must be contiguous and on the CPU, got {t.device}, {t.stride()}")
    return t.reshape(-1).view(torch.uint8).numpy()


def frame_tensor(frame: memoryview, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """The tensor in a received frame (no copy), after checking its byte size against shape and dtype."""
    expected = math.prod(shape) * dtype.itemsize
    if frame.nbytes != expected:
        raise ProtocolError(f"{what} frame has {frame.nbytes} bytes, expected {expected} for {shape}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if frame.readonly:  # bytes from a non-ZMQ source; ZMQ frames are writable and stay zero-copy
        frame = memoryview(bytearray(frame))
    return torch.frombuffer(frame, dtype=dtype).view(shape)


class HeaderFields:
    """Typed access to a decoded header map that must hold exactly the expected keys."""

    def __init__(self, obj: object, keys: frozenset[str], where: str) -> None:
        if not isinstance(obj, dict):
            raise ProtocolError(f"{where} must be a map, got {type(obj).__name__}")
        missing, extra = keys - obj.keys(), obj.keys() - keys
        if missing or extra:  # a peer's keys may mix str and bytes: sorted by their repr
            raise ProtocolError(
                f"{where}: missing fields {sorted(missing)}, unexpected {sorted(extra, key=repr)!r:.200}"
            )
        self._map, self._where = obj, where

    def _fail(self, key: str, want: str) -> ProtocolError:
        return ProtocolError(f"{self._where}.{key} must be {want}, got {self._map[key]!r:.80}")

    def int(self, key: str, lo: int = 0, hi: int = MAX_ROOM) -> int:
        value = self._map[key]
        if type(value) is not int or not lo <= value <= hi:
            raise self._fail(key, f"an int in [{lo}, {hi}]")
        return value

    def str(self, key: str) -> str:
        value = self._map[key]
        if type(value) is not str:
            raise self._fail(key, "a str")
        return value

    def opt_float(self, key: str) -> float | None:
        value = self._map[key]
        if value is None:
            return None
        if type(value) not in (int, float):
            raise self._fail(key, "a float or null")
        return float(value)

    def bool(self, key: str) -> bool:
        value = self._map[key]
        if type(value) is not bool:
            raise self._fail(key, "a bool")
        return value

    def int_list(self, key: str, lo: int, hi: int) -> list[int]:
        value = self._map[key]
        if type(value) is not list or any(type(v) is not int or not lo <= v <= hi for v in value):
            raise self._fail(key, f"a list of ints in [{lo}, {hi}]")
        return value

    def bytes(self, key: str, size: int) -> bytes:
        value = self._map[key]
        if type(value) is not bytes or len(value) != size:
            raise self._fail(key, f"{size} bytes")
        return value

    def str_list(self, key: str) -> list[str]:
        value = self._map[key]
        if type(value) is not list or any(type(v) is not str for v in value):
            raise self._fail(key, "a list of str")
        return value

    def get(self, key: str) -> object:
        return self._map[key]
