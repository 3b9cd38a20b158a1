"""`/v1/chat/completions`: the chat template over `messages` (and `tools`), the answer as OpenAI's message.

With --reasoning-parser the message carries `reasoning_content` apart from `content`; with
--tool-call-parser a request may offer `tools`, whose calls come back as `tool_calls` (finish_reason
"tool_calls"). The tokens that write those formats are special tokens, so a request with tools keeps
special tokens in its text (as SGLang does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tpla_serve.server.chat_output import ChatDeltas, ChatParsing
from tpla_serve.server.errors import APIError
from tpla_serve.server.openai_api import (
    answer,
    check_model,
    finish_reason,
    item_options,
    matched_stop,
    token_text,
    usage,
)
from tpla_serve.server.protocol import ChatCompletionRequest
from tpla_serve.server.state import FrontState, front_state

router = APIRouter(prefix="/v1")


def chat_logprobs(meta: dict[str, Any], start: int) -> dict[str, Any]:
    entries = meta.get("output_token_logprobs", [])[start:]
    tops = meta.get("output_top_logprobs", [])[start:]

    def item(e: list[Any]) -> dict[str, Any]:
        token = token_text(e)
        return {"token": token, "logprob": e[0], "bytes": list(token.encode())}

    content = []
    for i, e in enumerate(entries):
        top = tops[i] if i < len(tops) else None
        content.append({**item(e), "top_logprobs": [item(x) for x in (top or [])]})
    return {"content": content}


def _parsing(front: FrontState, body: ChatCompletionRequest) -> ChatParsing:
    """What to parse out of the answer; refuses tools the server cannot turn into tool_calls."""
    tools = None
    if body.tools and body.tool_choice != "none":
        if front.config.tool_call_parser is None:
            raise APIError(400, "tools: this server was started without --tool-call-parser, so it cannot return "
                                "tool_calls (start it with --tool-call-parser deepseekv3)", param="tools")
        if body.tool_choice is not None and body.tool_choice != "auto":
            raise APIError(400, "tool_choice: forcing a tool call ('required' or a named function) needs "
                                "constrained decoding, which this server does not do yet; use 'auto' or 'none'",
                           param="tool_choice")
        tools = frozenset(tool.function.name for tool in body.tools)
    reasoning = front.config.reasoning_parser is not None and body.separate_reasoning
    return ChatParsing(reasoning=reasoning, stream_reasoning=body.stream_reasoning, tools=tools)


def _chat_prompt(front: FrontState, body: ChatCompletionRequest, with_tools: bool) -> list[int]:
    tokenizer = front.inputs.require_tokenizer("messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "messages: this model's tokenizer has no chat template; use /v1/completions or start "
                            "the server with --chat-template", param="messages")
    messages = [m.template_dict() for m in body.messages]
    kwargs = dict(body.chat_template_kwargs or {})
    if with_tools and body.tools:
        kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in body.tools]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as e:  # the template itself rejects the conversation (roles, order, ...)
        raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None
    # The template writes the special tokens (BOS) itself.
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    front.inputs.check_ids(ids, "messages")
    return ids


def _finish_reason(meta: dict[str, Any], called_tools: bool) -> str | None:
    reason = finish_reason(meta)
    return "tool_calls" if called_tools and reason == "stop" else reason


@dataclass
class _ChoiceStream:
    """What one streamed choice has sent: its role chunk, text and logprob entries so far."""

    deltas: ChatDeltas
    role_sent: bool = False
    text: int = 0
    logprobs: int = 0


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    front = front_state(request)
    front.client.check_available()
    check_model(front, body.model)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    parsing = _parsing(front, body)
    prompt = _chat_prompt(front, body, with_tools=parsing.tools is not None)
    if parsing.tools is not None:
        body = body.model_copy(update={"skip_special_tokens": False})  # the tool tokens must reach the parser
    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    options = item_options(body, 1, max_new, body.logprobs, body.top_logprobs or 0)
    requests = front.inputs.build([prompt], options, body.rid, body, batched=False, sampling_field=None)
    group = front.client.submit(requests)
    cid, created = f"chatcmpl-{group.rids[0]}", int(time.time())

    def envelope(obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": cid, "object": obj, "created": created, "model": front.model_name,
                "choices": choices, **extra}

    def respond(outputs: list[dict[str, Any]]) -> dict[str, Any]:
        choices = []
        for index, out in enumerate(outputs):  # one per sample (n)
            meta = out["meta_info"]
            message = parsing.message(out["text"])
            choices.append({
                "index": index,
                "message": message,
                "logprobs": chat_logprobs(meta, 0) if body.logprobs else None,
                "finish_reason": _finish_reason(meta, "tool_calls" in message),
                "matched_stop": matched_stop(meta),
            })
        return envelope("chat.completion", choices, usage=usage(outputs, 1))

    streams = [_ChoiceStream(parsing.stream()) for _ in range(len(group))]

    def chunk(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
              finish: dict[str, Any] | None = None) -> dict[str, Any]:
        """One chunk of choice `index`; `logprobs`: the meta whose new logprobs it carries; `finish`: the
        final meta."""
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        if logprobs is not None and body.logprobs:
            choice["logprobs"] = chat_logprobs(logprobs, streams[index].logprobs)
        if finish is not None:
            choice["finish_reason"] = _finish_reason(finish, streams[index].deltas.called_tools)
            choice["matched_stop"] = matched_stop(finish)
        return envelope("chat.completion.chunk", [choice])

    def chunks(index: int, out: dict[str, Any], finished: bool) -> list[dict[str, Any]]:
        meta, state = out["meta_info"], streams[index]
        result = []
        if not state.role_sent:
            state.role_sent = True
            result.append(chunk(index, {"role": "assistant", "content": ""}))
        pieces = state.deltas.feed(out["text"][state.text:])
        if finished:
            pieces += state.deltas.finish()
        n_lp = len(meta.get("output_token_logprobs", []))
        if not pieces and (finished or n_lp != state.logprobs):
            pieces = [{}]  # the end, or new logprobs, with no text to show
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            result.append(chunk(index, piece, meta if i == 0 else None, meta if finished and last else None))
        state.text, state.logprobs = len(out["text"]), n_lp
        return result

    return await answer(request, group, body, respond, chunks,
                        lambda u: envelope("chat.completion.chunk", [], usage=u), 1)
