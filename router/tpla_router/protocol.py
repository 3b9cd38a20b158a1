"""What the router reads from and adds to a generation request (DESIGN §4's PD contract).

The router parses only the fields it needs (batch shape, stream, logprobs, token caps, routing text)
and leaves every other field exactly as the client sent it.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import RouterError
from .worker import Worker


class Route(str, Enum):
    GENERATE = "/generate"
    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"


def new_room() -> int:
    """A random 63-bit bootstrap room; unguessable so one client cannot join another's KV transfer."""
    return secrets.randbits(63)


@dataclass(frozen=True)
class PDRequest:
    route: Route
    body: dict[str, Any]
    batch_size: int | None
    stream: bool
    merge_logprobs: bool
    routing_key: str | None

    def render(self, prefill: Worker) -> tuple[bytes, list[str]]:
        """The body both workers get for one attempt, and the rids to abort it by.

        Each attempt gets fresh rooms, and a fresh rid unless the client chose one, so a retry never
        collides with the remains of a failed attempt.
        """
        body = dict(self.body)
        if self.batch_size is None:
            body["bootstrap_host"] = prefill.bootstrap_host
            body["bootstrap_port"] = prefill.bootstrap_port
            body["bootstrap_room"] = new_room()
        else:
            body["bootstrap_host"] = [prefill.bootstrap_host] * self.batch_size
            body["bootstrap_port"] = [prefill.bootstrap_port] * self.batch_size
            body["bootstrap_room"] = [new_room() for _ in range(self.batch_size)]
        rid = body.get("rid")
        if rid is None:
            base = uuid.uuid4().hex
            rid = base if self.batch_size is None else [f"{base}-{i}" for i in range(self.batch_size)]
            body["rid"] = rid
        rids = [str(r) for r in rid] if isinstance(rid, list) else [str(rid)]
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(), rids


def parse_request(route: Route, raw: bytes, max_new_tokens_cap: int | None) -> PDRequest:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
    if max_new_tokens_cap is not None:
        _enforce_cap(route, body, caps, max_new_tokens_cap)
    return PDRequest(route, body, batch_size, bool(body.get("stream")), merge, key)


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
        text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
        parts.append(f"{m.get('role')}\x1f{text}\x1e")
    return "".join(parts) or None


def _generate_caps(body: dict[str, Any]) -> list[tuple[str, Any]]:
    params = body.get("sampling_params")
    if isinstance(params, dict):
        return [("sampling_params.max_new_tokens", params.get("max_new_tokens"))]
    if isinstance(params, list):
        return [(f"sampling_params[{i}].max_new_tokens", p.get("max_new_tokens"))
                for i, p in enumerate(params) if isinstance(p, dict)]
    return []


def _enforce_cap(route: Route, body: dict[str, Any], caps: list[tuple[str, Any]], cap: int) -> None:
    """Reject explicit values over the cap; OpenAI requests without one get the cap.

    An OpenAI request without max_tokens may run to the context length, so the cap is filled in;
    SGLang's /generate has a small server-side default and is left alone.
    """
    for name, value in caps:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
            raise RouterError(400, f"{name}={value} exceeds this router's max_new_tokens cap of {cap}",
                              "bad_request")
    if route is not Route.GENERATE and all(value is None for _, value in caps):
        body["max_tokens"] = cap
