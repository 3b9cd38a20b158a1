"""Prompt logprobs come from the prefill server; the router prepends them to the decode server's, as
SGLang's router does.

A decode server never sees the prompt's logits, so an SGLang decode's `meta_info.input_token_logprobs`
holds only what it computed itself (usually nothing). A tpla-serve prefill sends them to its decode with
the KV instead (DESIGN §4) and answers with none: the merge then adds nothing, and SGLang's router, which
merges the same way, gives the same answer. Batch responses are lists, and streamed batch events carry an
`index`; items are matched by position / index.
"""

from __future__ import annotations

import json
from typing import Any

_DATA = b"data:"


def _dumps(payload: Any) -> bytes:
    # A lone surrogate (from a \udXXX escape in the decode's JSON) goes back out as that same escape.
    return json.dumps(payload, ensure_ascii=False).encode("utf-8", "backslashreplace")


def _index(event: dict[str, Any]) -> int:
    """A streamed batch event's item index; events of a single request carry none."""
    index = event.get("index", 0)
    return index if isinstance(index, int) else 0


def _items(payload: Any) -> list[Any]:
    return payload if isinstance(payload, list) else [payload]


def _prompt_logprobs(item: Any) -> list[Any] | None:
    if isinstance(item, dict) and isinstance(item.get("meta_info"), dict):
        lp = item["meta_info"].get("input_token_logprobs")
        if isinstance(lp, list):
            return lp
    return None


def _prepend(item: Any, prefix: list[Any] | None) -> None:
    own = _prompt_logprobs(item)
    if prefix is not None and own is not None:
        item["meta_info"]["input_token_logprobs"] = prefix + own


def prefill_prompt_logprobs(body: bytes) -> dict[int, list[Any]]:
    """Per item index, the prefill's prompt logprobs, from a JSON body or an SSE stream (last event wins)."""
    found: dict[int, list[Any]] = {}
    stripped = body.lstrip()
    if stripped.startswith(_DATA):
        for line in stripped.splitlines():
            if not line.startswith(_DATA):
                continue
            data = line[len(_DATA):].strip()
            if data == b"[DONE]":
                continue
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                continue
            lp = _prompt_logprobs(event)
            if lp is not None:
                found[_index(event)] = lp
        return found
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return found
    for i, item in enumerate(_items(payload)):
        lp = _prompt_logprobs(item)
        if lp is not None:
            found[i] = lp
    return found


def merge_response(prefill: dict[int, list[Any]], decode_body: bytes) -> bytes:
    """The decode's JSON response with the prefill's prompt logprobs prepended per item."""
    try:
        payload = json.loads(decode_body)
    except json.JSONDecodeError:
        return decode_body
    for i, item in enumerate(_items(payload)):
        _prepend(item, prefill.get(i))
    return _dumps(payload)


class StreamMerger:
    """Rewrites SSE `data:` events as they pass, prepending the prefill's prompt logprobs.

    Bytes are forwarded event by event (an event ends at a blank line), so nothing waits for more than
    the event it is part of.
    """

    def __init__(self, prefill: dict[int, list[Any]]) -> None:
        self._prefill = prefill
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        self._pending = data[end + 2:]
        return b"".join(self._rewrite(event) + b"\n\n" for event in data[:end].split(b"\n\n"))

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return self._rewrite(rest) if rest else b""

    def _rewrite(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        for n, line in enumerate(lines):
            if not line.startswith(_DATA):
                continue
            data = line[len(_DATA):].strip()
            if data == b"[DONE]":
                continue
            try:
                payload = json.loads(data)
            except json.JSONDecodeError:
                continue
            if isinstance(payload, dict):
                _prepend(payload, self._prefill.get(_index(payload)))
                lines[n] = b"data: " + _dumps(payload)
        return b"\n".join(lines)
