"""`/v1/completions`: prompts as text or token ids, single or a batch, with logprobs and echo.

echo=True puts the prompt in front of each completion, as OpenAI does; with logprobs, the prompt's
tokens come first with their logprobs (the first token's is null: nothing precedes it).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

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
from tpla_serve.server.protocol import CompletionRequest
from tpla_serve.server.state import FrontState, front_state

router = APIRouter(prefix="/v1")


def legacy_logprobs(entries: list[list[Any]], tops: list[Any], text_offset: int) -> dict[str, Any]:
    """The completions format (tokens, token_logprobs, top_logprobs, text_offset) of logprob entries."""
    tokens = [token_text(e) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e[0] for e in entries],
        "top_logprobs": [None if top is None else {token_text(x): x[0] for x in top} for top in tops] or None,
        "text_offset": offsets,
    }


def prompt_logprobs(meta: dict[str, Any], text: str) -> dict[str, Any]:
    """The echoed prompt's entries; offsets point into `text` (a token the text does not show, as BOS, sits at
    the offset where it stands, taking no room)."""
    out = legacy_logprobs(meta.get("input_token_logprobs", []), meta.get("input_top_logprobs", []), 0)
    offset = 0
    for i, token in enumerate(out["tokens"]):
        out["text_offset"][i] = offset
        if token and text.startswith(token, offset):
            offset += len(token)
    return out


def _join(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    tops = (a["top_logprobs"] or [None] * len(a["tokens"])) + (b["top_logprobs"] or [None] * len(b["tokens"]))
    return {"tokens": a["tokens"] + b["tokens"], "token_logprobs": a["token_logprobs"] + b["token_logprobs"],
            "top_logprobs": tops if a["top_logprobs"] or b["top_logprobs"] else None,
            "text_offset": a["text_offset"] + b["text_offset"]}


def _prompts(front: FrontState, body: CompletionRequest) -> tuple[list[list[int]], list[str], bool]:
    """Token ids and text of each prompt, and whether the body is a batch (texts only with echo)."""
    prompt = body.prompt
    inputs = front.inputs
    if isinstance(prompt, str):
        texts, batched = [prompt], False
    elif prompt and isinstance(prompt[0], str):
        texts, batched = list(prompt), True  # type: ignore[arg-type]
    else:
        batched = bool(prompt) and isinstance(prompt[0], list)
        ids: list[list[int]] = list(prompt) if batched else [list(prompt)]  # type: ignore[arg-type]
        for i, p in enumerate(ids):
            inputs.check_ids(p, f"prompt[{i}]" if batched else "prompt")
        decoded = [inputs.require_tokenizer("echo").decode(p) for p in ids] if body.echo else [""] * len(ids)
        return ids, decoded, batched
    ids = [inputs.tokenize(t) for t in texts]
    for i, p in enumerate(ids):
        inputs.check_ids(p, f"prompt[{i}]" if batched else "prompt")
    return ids, texts, batched


def _check(body: CompletionRequest) -> None:
    if body.suffix:
        raise APIError(400, "suffix: not supported by this server", param="suffix")
    if body.best_of not in (None, 1):
        raise APIError(400, f"best_of: only best_of=1 is supported, got {body.best_of}", param="best_of")
    if body.echo and body.logprobs is not None and body.bootstrap_room is not None:
        raise APIError(400, "echo with logprobs: a PD decode server does not compute the prompt's logprobs (the "
                            "prefill server does); send this request to a server without --disaggregation-mode",
                       param="echo")


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    front = front_state(request)
    front.client.check_available()
    check_model(front, body.model)
    _check(body)
    prompts, texts, batched = _prompts(front, body)
    logprobs = body.logprobs is not None
    echo_logprobs = body.echo and logprobs
    options = item_options(body, len(prompts), body.max_tokens, logprobs, body.logprobs or 0,
                           logprob_start_len=0 if echo_logprobs else -1)
    group = front.client.submit(front.inputs.build(prompts, options, body.rid, body, batched, sampling_field=None))
    num_prompts = len(prompts)
    cid, created = f"cmpl-{group.rids[0]}", int(time.time())

    def envelope(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": front.model_name,
                "choices": choices, **extra}

    def echoed(index: int, meta: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """The prompt's text and (with logprobs) its logprob entries, for an echo."""
        if not body.echo:
            return "", None
        text = texts[index % num_prompts]  # choices are copy-major over the prompts (n > 1)
        return text, prompt_logprobs(meta, text) if logprobs else None

    def output_logprobs(meta: dict[str, Any], start: int, offset: int) -> dict[str, Any]:
        return legacy_logprobs(meta.get("output_token_logprobs", [])[start:],
                               meta.get("output_top_logprobs", [])[start:], offset)

    def respond(outputs: list[dict[str, Any]]) -> dict[str, Any]:
        choices = []
        for i, out in enumerate(outputs):
            meta = out["meta_info"]
            prefix, prefix_lp = echoed(i, meta)
            lp = output_logprobs(meta, 0, len(prefix)) if logprobs else None
            choices.append({
                "index": i,
                "text": prefix + out["text"],
                "logprobs": _join(prefix_lp, lp) if prefix_lp is not None and lp is not None else lp,
                "finish_reason": finish_reason(meta),
                "matched_stop": matched_stop(meta),
            })
        return envelope(choices, usage=usage(outputs, num_prompts))

    sent_text: dict[int, int] = {}
    sent_lp: dict[int, int] = {}

    def chunks(index: int, out: dict[str, Any], finished: bool) -> list[dict[str, Any]]:
        meta = out["meta_info"]
        first = index not in sent_text
        prefix, prefix_lp = echoed(index, meta) if first else ("", None)
        text_start = sent_text.get(index, 0)
        delta = out["text"][text_start:]
        n_lp = len(meta.get("output_token_logprobs", []))
        if not (first and body.echo) and not delta and not finished and n_lp == sent_lp.get(index, 0):
            return []
        offset = len(texts[index % num_prompts]) + text_start if body.echo else text_start
        lp = output_logprobs(meta, sent_lp.get(index, 0), offset) if logprobs else None
        choice = {
            "index": index,
            "text": prefix + delta,
            "logprobs": _join(prefix_lp, lp) if prefix_lp is not None and lp is not None else lp,
            "finish_reason": finish_reason(meta) if finished else None,
        }
        if finished:
            choice["matched_stop"] = matched_stop(meta)
        sent_text[index] = len(out["text"])
        sent_lp[index] = n_lp
        return [envelope([choice])]

    return await answer(request, group, body, respond, chunks, lambda u: envelope([], usage=u), num_prompts)
