"""What the router reads from and adds to a generation request (DESIGN §4's PD contract).

The body is parsed once, strictly (orjson: no lone surrogates, no nesting past 1024 levels, valid
UTF-8), for the few facts the router needs: batch shape, stream, logprobs, token caps, routing text.
The bytes the workers get are the client's own bytes with the router's fields spliced in before the
closing brace, so unknown fields, number spellings and key order pass through untouched and a large
body is never re-encoded. Only a body that already carries a field the router owns (bootstrap_*, a
null rid or token limit) is rewritten once, with the stdlib encoder, which keeps big integers exact.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from .errors import RouterError
from .http import Body
from .worker import Worker

_OWNED = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


class Route(str, Enum):
    GENERATE = "/generate"
    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"

    @property
    def path_bytes(self) -> bytes:
        return self.value.encode()


def new_room() -> int:
    """A random 63-bit bootstrap room; unguessable so one client cannot join another's KV transfer."""
    return secrets.randbits(63)


@dataclass(frozen=True)
class PDRequest:
    route: Route
    base: memoryview  # the body up to (not including) its closing brace, fields to add included
    has_fields: bool  # `base` holds at least one field, so spliced fields need a leading comma
    client_rids: list[str] | None  # the client's own rid(s), kept on every attempt
    batch_size: int | None
    stream: bool
    merge_logprobs: bool
    routing_key: str | None

    def render(self, prefill: Worker, rid: str) -> tuple[Body, list[str]]:
        """The body both workers get for one attempt, and the rids to abort it by.

        Each attempt gets fresh rooms, and the fresh `rid` (batch items: rid-0, rid-1, ...) unless the
        client chose its own, so a retry never collides with the remains of a failed attempt.
        """
        n = self.batch_size
        if n is None:
            fields = b'%b,"bootstrap_room":%d' % (prefill.bootstrap_fields, new_room())
        else:
            rooms = ",".join(str(new_room()) for _ in range(n)).encode()
            fields = b'%b,"bootstrap_room":[%b]' % (prefill.bootstrap_fields_batch(n), rooms)
        rids = self.client_rids
        if rids is None:
            rids = [rid] if n is None else [f"{rid}-{i}" for i in range(n)]
            fields += b',"rid":' + orjson.dumps(rids[0] if n is None else rids)
        tail = (b"," if self.has_fields else b"") + fields + b"}"
        return (self.base, tail), rids


def parse_request(route: Route, raw: bytes, max_new_tokens_cap: int | None) -> PDRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RouterError(400, f"request body is not valid JSON: {e}", "bad_request") from None
    if not isinstance(body, dict):
        raise RouterError(400, "request body must be a JSON object", "bad_request")
    if route is Route.GENERATE:
        batch_size, key = _generate_shape(body)
        caps = _generate_caps(body)
        rl = body.get("return_logprob")
        merge = any(bool(x) for x in rl) if isinstance(rl, list) else bool(rl)
    elif route is Route.COMPLETIONS:
        batch_size, key = _completions_shape(body)
        caps = [("max_tokens", body.get("max_tokens"))]
        merge = False
    else:
        batch_size, key = None, _chat_key(body)
        caps = [("max_tokens", body.get("max_tokens")),
                ("max_completion_tokens", body.get("max_completion_tokens"))]
        merge = False
    fill: int | None = None
    if max_new_tokens_cap is not None:
        fill = _enforce_cap(route, caps, max_new_tokens_cap)
    rid = body.get("rid")
    client_rids = None if rid is None else [str(r) for r in rid] if isinstance(rid, list) else [str(rid)]
    owned = any(k in body for k in _OWNED) or ("rid" in body and rid is None)
    if owned or (fill is not None and "max_tokens" in body):
        raw, empty = _rewritten(raw, fill)
    else:
        raw = raw.rstrip()
        empty = not body
        if fill is not None:
            raw = raw[:-1] + (b"" if empty else b",") + b'"max_tokens":%d}' % fill
            empty = False
    return PDRequest(route, memoryview(raw)[:-1], not empty, client_rids, batch_size,
                     bool(body.get("stream")), merge, key)


def _rewritten(raw: bytes, fill: int | None) -> tuple[bytes, bool]:
    """The body without the fields the router owns (and with the token cap filled in), re-encoded once."""
    body = json.loads(raw)  # already validated; the stdlib keeps integers of any size exact
    for k in _OWNED:
        body.pop(k, None)
    if "rid" in body and body["rid"] is None:
        del body["rid"]
    if fill is not None:
        body["max_tokens"] = fill
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(), not body


def _ids_key(ids: list[Any]) -> str:
    """Token ids as text whose string prefixes are exactly the token prefixes."""
    return "".join(f"{i}," for i in ids)


def _generate_shape(body: dict[str, Any]) -> tuple[int | None, str | None]:
    text = body.get("text")
    ids = body.get("input_ids")
    if text is not None:
        if isinstance(text, str):
            return None, text
        if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            raise RouterError(400, "text must be a string or a list of strings", "bad_request")
        if not text:
            raise RouterError(400, "text must not be an empty list", "bad_request")
        return len(text), text[0]
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise RouterError(400, "input_ids must be a non-empty list", "bad_request")
        if isinstance(ids[0], list):
            if not all(isinstance(row, list) for row in ids):
                raise RouterError(400, "input_ids must be a list of ints or a list of lists of ints",
                                  "bad_request")
            return len(ids), _ids_key(ids[0])
        return None, _ids_key(ids)
    embeds = body.get("input_embeds")
    if isinstance(embeds, list) and embeds and isinstance(embeds[0], list) and embeds[0] \
            and isinstance(embeds[0][0], list):
        return len(embeds), None
    return None, None


def _completions_shape(body: dict[str, Any]) -> tuple[int | None, str | None]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return None, prompt
    if isinstance(prompt, list):
        if not prompt:
            raise RouterError(400, "prompt must not be an empty list", "bad_request")
        if isinstance(prompt[0], str):
            return len(prompt), prompt[0]
        if isinstance(prompt[0], list):
            return len(prompt), _ids_key(prompt[0])
        return None, _ids_key(prompt)
    return None, None


def _chat_key(body: dict[str, Any]) -> str | None:
    """The transcript as text; a later turn of the same conversation extends an earlier one's key."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if not isinstance(content, str):
            content = orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode()
        parts.append(f"{m.get('role')}\x1f{content}\x1e")
    return "".join(parts) or None


def _generate_caps(body: dict[str, Any]) -> list[tuple[str, Any]]:
    params = body.get("sampling_params")
    if isinstance(params, dict):
        return [("sampling_params.max_new_tokens", params.get("max_new_tokens"))]
    if isinstance(params, list):
        return [(f"sampling_params[{i}].max_new_tokens", p.get("max_new_tokens"))
                for i, p in enumerate(params) if isinstance(p, dict)]
    return []


def _enforce_cap(route: Route, caps: list[tuple[str, Any]], cap: int) -> int | None:
    """Reject explicit values over the cap; returns the max_tokens to fill in, if any.

    An OpenAI request without max_tokens may run to the context length, so the cap is filled in;
    SGLang's /generate has a small server-side default and is left alone.
    """
    for name, value in caps:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
            raise RouterError(400, f"{name}={value} exceeds this router's max_new_tokens cap of {cap}",
                              "bad_request")
    if route is not Route.GENERATE and all(value is None for _, value in caps):
        return cap
    return None
