"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Each maps onto the same scheduler requests as /generate (OpenAI sampling fields → SGLang's
sampling_params, `seed` → sampling_seed), so the PD bootstrap fields pass through unchanged.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tpla_serve.server.errors import APIError, error_body
from tpla_serve.server.generation import (
    DONE,
    SSE_HEADERS,
    ClientDisconnected,
    collect,
    first_answer,
    sse,
    stream_answers,
)
from tpla_serve.server.inputs import ItemOptions
from tpla_serve.server.protocol import ChatCompletionRequest, CompletionRequest, OpenAISampling
from tpla_serve.server.scheduler_client import RequestGroup
from tpla_serve.server.state import FrontState, front_state

router = APIRouter(prefix="/v1")


def finish_reason(meta: dict[str, Any]) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else str(reason.get("type"))


def _matched_stop(meta: dict[str, Any]) -> Any:
    reason = meta.get("finish_reason") or {}
    return reason.get("matched")


def _usage(outputs: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(int(o["meta_info"].get("prompt_tokens", 0)) for o in outputs)
    completion = sum(int(o["meta_info"].get("completion_tokens", 0)) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_text(entry: list[Any]) -> str:
    return entry[2] if len(entry) > 2 and entry[2] is not None else ""


def completion_logprobs(meta: dict[str, Any], start: int, text_offset: int) -> dict[str, Any]:
    """The legacy completions format for output tokens start.. (tokens, token_logprobs, top_logprobs)."""
    entries = meta.get("output_token_logprobs", [])[start:]
    tops = meta.get("output_top_logprobs", [])[start:] if "output_top_logprobs" in meta else []
    tokens = [_token_text(e) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e[0] for e in entries],
        "top_logprobs": [{_token_text(x): x[0] for x in (top or [])} for top in tops] or None,
        "text_offset": offsets,
    }


def chat_logprobs(meta: dict[str, Any], start: int) -> dict[str, Any]:
    entries = meta.get("output_token_logprobs", [])[start:]
    tops = meta.get("output_top_logprobs", [])[start:]

    def item(e: list[Any]) -> dict[str, Any]:
        token = _token_text(e)
        return {"token": token, "logprob": e[0], "bytes": list(token.encode())}

    content = []
    for i, e in enumerate(entries):
        top = tops[i] if i < len(tops) else None
        content.append({**item(e), "top_logprobs": [item(x) for x in (top or [])]})
    return {"content": content}


def _options(body: OpenAISampling, n: int, max_new_tokens: int | None, logprobs: bool,
             top_logprobs: int) -> ItemOptions:
    return ItemOptions(
        sampling_params=[body.sampling_dict(max_new_tokens)] * n,
        return_logprob=[logprobs] * n,
        logprob_start_len=[-1] * n,
        top_logprobs_num=[top_logprobs] * n,
        return_text_in_logprobs=True,
        stream=body.stream,
    )


async def _run(
    request: Request,
    group: RequestGroup,
    body: OpenAISampling,
    respond: Callable[[list[dict[str, Any]]], dict[str, Any]],
    chunks: Callable[[int, dict[str, Any], bool], list[dict[str, Any]]],
    usage_chunk: Callable[[dict[str, int]], dict[str, Any]],
) -> Response:
    try:
        if not body.stream:
            return JSONResponse(respond(await collect(group, request)))
        first = await first_answer(group, request)
    except ClientDisconnected:
        return Response(status_code=499)

    async def events() -> AsyncIterator[bytes]:
        last: dict[int, dict[str, Any]] = {}
        try:
            async for index, output, finished in stream_answers(group, first):
                for chunk in chunks(index, output, finished):
                    yield sse(chunk)
                last[index] = output
            if body.include_usage:
                yield sse(usage_chunk(_usage(list(last.values()))))
        except APIError as e:
            yield sse(error_body(e.status, e.message, e.err_type))
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    front = front_state(request)
    card: dict[str, Any] = {
        "id": front.model_name,
        "object": "model",
        "created": front.created,
        "owned_by": "tpla-serve",
        "root": front.config.engine.model_path,
    }
    if front.client.model_info.get("context_length") is not None:
        card["max_model_len"] = front.client.model_info["context_length"]
    return {"object": "list", "data": [card]}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    front = front_state(request)
    front.client.check_available()
    if body.echo:
        raise APIError(400, "echo: not supported by this server")
    if body.suffix:
        raise APIError(400, "suffix: not supported by this server")
    if body.best_of not in (None, 1):
        raise APIError(400, f"best_of: only best_of=1 is supported, got {body.best_of}")
    prompt = body.prompt
    inputs = front.inputs
    if isinstance(prompt, str):
        prompts, batched = [inputs.tokenize(prompt)], False
    elif prompt and isinstance(prompt[0], str):
        prompts, batched = [inputs.tokenize(p) for p in prompt], True  # type: ignore[arg-type]
    elif prompt and isinstance(prompt[0], list):
        prompts, batched = list(prompt), True  # type: ignore[arg-type]
    else:
        prompts, batched = [list(prompt)], False  # type: ignore[arg-type]
    for i, p in enumerate(prompts):
        inputs.check_ids(p, f"prompt[{i}]" if batched else "prompt")
    logprobs = body.logprobs is not None
    options = _options(body, len(prompts), body.max_tokens, logprobs, body.logprobs or 0)
    group = front.client.submit(inputs.build(prompts, options, body.rid, body, batched, sampling_field=None))
    cid, created = f"cmpl-{group.rids[0]}", int(time.time())

    def envelope(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": front.model_name,
                "choices": choices, **extra}

    def respond(outputs: list[dict[str, Any]]) -> dict[str, Any]:
        choices = []
        for i, out in enumerate(outputs):
            meta = out["meta_info"]
            choices.append({
                "index": i,
                "text": out["text"],
                "logprobs": completion_logprobs(meta, 0, 0) if logprobs else None,
                "finish_reason": finish_reason(meta),
                "matched_stop": _matched_stop(meta),
            })
        return envelope(choices, usage=_usage(outputs))

    sent_text: dict[int, int] = {}
    sent_lp: dict[int, int] = {}

    def chunks(index: int, out: dict[str, Any], finished: bool) -> list[dict[str, Any]]:
        meta = out["meta_info"]
        text_start = sent_text.get(index, 0)
        delta = out["text"][text_start:]
        n_lp = len(meta.get("output_token_logprobs", []))
        if not delta and not finished and n_lp == sent_lp.get(index, 0):
            return []
        choice = {
            "index": index,
            "text": delta,
            "logprobs": completion_logprobs(meta, sent_lp.get(index, 0), text_start) if logprobs else None,
            "finish_reason": finish_reason(meta) if finished else None,
        }
        if finished:
            choice["matched_stop"] = _matched_stop(meta)
        sent_text[index] = len(out["text"])
        sent_lp[index] = n_lp
        return [envelope([choice])]

    return await _run(request, group, body, respond, chunks, lambda u: envelope([], usage=u))


def _chat_prompt(front: FrontState, body: ChatCompletionRequest) -> list[int]:
    tokenizer = front.inputs.require_tokenizer("messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "messages: this model's tokenizer has no chat template; use /v1/completions")
    messages = [m.template_dict() for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(body.chat_template_kwargs or {})
        )
    except Exception as e:  # the template itself rejects the conversation (roles, order, ...)
        raise APIError(400, f"messages: the chat template failed: {e}") from None
    # The template writes the special tokens (BOS) itself.
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    front.inputs.check_ids(ids, "messages")
    return ids


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    front = front_state(request)
    front.client.check_available()
    if body.tools:
        raise APIError(400, "tools: tool calling is not supported by this server")
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true")
    prompt = _chat_prompt(front, body)
    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    options = _options(body, 1, max_new, body.logprobs, body.top_logprobs or 0)
    requests = front.inputs.build([prompt], options, body.rid, body, batched=False, sampling_field=None)
    group = front.client.submit(requests)
    cid, created = f"chatcmpl-{group.rids[0]}", int(time.time())

    def envelope(obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": cid, "object": obj, "created": created, "model": front.model_name,
                "choices": choices, **extra}

    def respond(outputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = outputs[0]
        meta = out["meta_info"]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": out["text"]},
            "logprobs": chat_logprobs(meta, 0) if body.logprobs else None,
            "finish_reason": finish_reason(meta),
            "matched_stop": _matched_stop(meta),
        }
        return envelope("chat.completion", [choice], usage=_usage(outputs))

    state = {"text": 0, "lp": 0, "role_sent": False}

    def chunks(index: int, out: dict[str, Any], finished: bool) -> list[dict[str, Any]]:
        meta = out["meta_info"]
        result = []
        if not state["role_sent"]:
            state["role_sent"] = True
            result.append(envelope("chat.completion.chunk", [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]))
        delta = out["text"][state["text"]:]
        n_lp = len(meta.get("output_token_logprobs", []))
        if delta or finished or n_lp != state["lp"]:
            choice = {
                "index": 0,
                "delta": {"content": delta} if delta else {},
                "logprobs": chat_logprobs(meta, state["lp"]) if body.logprobs else None,
                "finish_reason": finish_reason(meta) if finished else None,
            }
            if finished:
                choice["matched_stop"] = _matched_stop(meta)
            result.append(envelope("chat.completion.chunk", [choice]))
        state["text"], state["lp"] = len(out["text"]), n_lp
        return result

    return await _run(request, group, body, respond, chunks,
                      lambda u: envelope("chat.completion.chunk", [], usage=u))
