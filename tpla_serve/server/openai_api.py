"""OpenAI-compatible routes: /v1/models and /v1/models/{model}, and what /v1/completions and
/v1/chat/completions share (the model check, usage, finish reasons, the answer or its SSE stream).

Completions and chat map onto the same scheduler requests as /generate (OpenAI sampling fields →
SGLang's sampling_params, `seed` → sampling_seed), so the PD bootstrap fields pass through unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tpla_serve.server.errors import MODEL_NOT_FOUND, APIError, api_error_body
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
from tpla_serve.server.protocol import OpenAISampling
from tpla_serve.server.scheduler_client import RequestGroup
from tpla_serve.server.state import FrontState, front_state

router = APIRouter(prefix="/v1")


def check_model(front: FrontState, model: str | None) -> None:
    """A request names the served model or none; any other name is OpenAI's 404 model_not_found."""
    if model is not None and model != front.model_name:
        raise APIError(404, f"the model `{model}` does not exist: this server serves `{front.model_name}` "
                            "(GET /v1/models)", param="model", code=MODEL_NOT_FOUND)


def finish_reason(meta: dict[str, Any]) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else str(reason.get("type"))


def matched_stop(meta: dict[str, Any]) -> Any:
    reason = meta.get("finish_reason") or {}
    return reason.get("matched")


def usage(outputs: list[dict[str, Any]], num_prompts: int) -> dict[str, Any]:
    """OpenAI's usage: each prompt counted once however many samples it has (outputs are copy-major, so
    the first num_prompts are one sample of each), every sample's completion tokens."""
    firsts = [o["meta_info"] for o in outputs[:num_prompts]]
    prompt = sum(int(m.get("prompt_tokens", 0)) for m in firsts)
    completion = sum(int(o["meta_info"].get("completion_tokens", 0)) for o in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(int(m.get("cached_tokens", 0)) for m in firsts)},
    }


def token_text(entry: list[Any]) -> str:
    return entry[2] if len(entry) > 2 and entry[2] is not None else ""


def item_options(body: OpenAISampling, n: int, max_new_tokens: int | None, logprobs: bool, top_logprobs: int,
                 logprob_start_len: int = -1) -> ItemOptions:
    return ItemOptions(
        sampling_params=[body.sampling_dict(max_new_tokens)] * n,
        return_logprob=[logprobs] * n,
        logprob_start_len=[logprob_start_len] * n,
        top_logprobs_num=[top_logprobs] * n,
        return_text_in_logprobs=True,
        stream=body.stream,
    )


async def answer(
    request: Request,
    group: RequestGroup,
    body: OpenAISampling,
    respond: Callable[[list[dict[str, Any]]], dict[str, Any]],
    chunks: Callable[[int, dict[str, Any], bool], list[dict[str, Any]]],
    usage_chunk: Callable[[dict[str, Any]], dict[str, Any]],
    num_prompts: int,
) -> Response:
    """The JSON answer once every item finished, or the SSE stream of `chunks` (then usage, then [DONE])."""
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
                yield sse(usage_chunk(usage([last[i] for i in sorted(last)], num_prompts)))
        except APIError as e:
            yield sse(api_error_body(e))
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def model_card(front: FrontState) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": front.model_name,
        "object": "model",
        "created": front.created,
        "owned_by": "tpla-serve",
        "root": front.config.engine.model_path,
    }
    if front.client.model_info.get("context_length") is not None:
        card["max_model_len"] = front.client.model_info["context_length"]
    return card


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(front_state(request))]}


@router.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    front = front_state(request)
    check_model(front, model)
    return model_card(front)
