"""SGLang's native routes: /generate, health, model and server info, cache flush, abort, metrics."""

from __future__ import annotations

import asyncio
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tpla_serve.config import public_fields
from tpla_serve.entrypoints.streaming import LogprobIncrements
from tpla_serve.sampling.params import SamplingParams
from tpla_serve.server.errors import APIError, api_error_body
from tpla_serve.server.generation import (
    DONE,
    SSE_HEADERS,
    ClientDisconnected,
    collect,
    first_answer,
    sse,
    stream_answers,
)
from tpla_serve.server.inputs import ItemOptions, per_item
from tpla_serve.server.messages import GenerateRequest
from tpla_serve.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tpla_serve.server.protocol import AbortReqInput, ConcateAndAppendReqInput, GenerateReqInput
from tpla_serve.server.scheduler_client import RequestGroup
from tpla_serve.server.state import FrontState, front_state

HEALTH_GENERATE_TIMEOUT = 60.0

router = APIRouter()


def _version() -> str:
    try:
        return version("tpla-serve")
    except PackageNotFoundError:
        return "unknown"


def _prompts(front: FrontState, body: GenerateReqInput) -> tuple[list[list[int]], bool]:
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text and input_ids", param="text")
    inputs = front.inputs
    if body.text is not None:
        batched = isinstance(body.text, list)
        texts = body.text if isinstance(body.text, list) else [body.text]
        prompts = [inputs.tokenize(t) for t in texts]
        field = "text"
    else:
        ids = body.input_ids
        assert ids is not None
        batched = bool(ids) and isinstance(ids[0], list)
        prompts = ids if batched else [ids]  # type: ignore[list-item]
        field = "input_ids"
    for i, p in enumerate(prompts):
        inputs.check_ids(p, f"{field}[{i}]" if batched else field)
    return prompts, batched


async def stream_response(group: RequestGroup, request: Request, batched: bool) -> Response:
    first = await first_answer(group, request)

    increments = [LogprobIncrements() for _ in range(len(group))]

    async def events() -> Any:
        try:
            async for index, output, _ in stream_answers(group, first):
                chunk = increments[index].chunk(output)
                yield sse({**chunk, "index": index} if batched else chunk)
        except APIError as e:
            yield sse(api_error_body(e))
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/generate")
async def generate(body: GenerateReqInput, request: Request) -> Response:
    front = front_state(request)
    unsupported = body.unsupported_fields()
    if unsupported:
        raise APIError(400, f"{unsupported[0]}: not supported by this server", param=unsupported[0])
    front.client.check_available()
    prompts, batched = _prompts(front, body)
    n = len(prompts)
    options = ItemOptions(
        sampling_params=per_item(body.sampling_params, n, "sampling_params", batched),
        return_logprob=per_item(body.return_logprob, n, "return_logprob", batched),
        logprob_start_len=per_item(body.logprob_start_len, n, "logprob_start_len", batched),
        top_logprobs_num=per_item(body.top_logprobs_num, n, "top_logprobs_num", batched),
        return_text_in_logprobs=body.return_text_in_logprobs,
        stream=body.stream,
    )
    requests = front.inputs.build(prompts, options, body.rid, body, batched)
    batched = batched or len(requests) > 1  # n > 1 answers a list, as SGLang does
    group = front.client.submit(requests)
    try:
        if body.stream:
            return await stream_response(group, request, batched)
        outputs = await collect(group, request)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(outputs if batched else outputs[0])


@router.get("/health")
async def health(request: Request) -> Response:
    """200 once the scheduler reported ready; 503 while loading or after it died."""
    front_state(request).client.check_available()
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """Healthy only if one real token can be generated end to end."""
    front = front_state(request)
    token = getattr(front.tokenizer, "bos_token_id", None) or 0
    req = GenerateRequest(
        rid=f"health_generate_{uuid.uuid4().hex}",
        input_ids=[int(token)],
        sampling_params=SamplingParams(max_new_tokens=1, temperature=0.0).to_dict(),
    )
    group = front.client.submit([req], log_metrics=False)
    try:
        outputs = await asyncio.wait_for(collect(group, request), HEALTH_GENERATE_TIMEOUT)
    except asyncio.TimeoutError:
        raise APIError(503, f"no token was generated within {HEALTH_GENERATE_TIMEOUT:g} s") from None
    except ClientDisconnected:
        return Response(status_code=499)
    if outputs[0]["meta_info"].get("completion_tokens", 0) < 1:
        reason = outputs[0]["meta_info"].get("finish_reason")
        raise APIError(503, f"the health check generated nothing: {reason}")
    return Response(status_code=200)


def model_info(front: FrontState) -> dict[str, Any]:
    front.client.check_available()
    engine = front.config.engine
    return {
        "model_path": engine.model_path,
        "tokenizer_path": engine.resolved_tokenizer_path,
        "served_model_name": front.model_name,
        "is_generation": True,
        **front.client.model_info,
    }


@router.get("/model_info")
@router.get("/get_model_info")
async def get_model_info(request: Request) -> dict[str, Any]:
    return model_info(front_state(request))


@router.get("/server_info")
@router.get("/get_server_info")
async def get_server_info(request: Request) -> dict[str, Any]:
    """The server's flags (no secrets), its model, and a fresh snapshot of the scheduler's state."""
    front = front_state(request)
    stats = await front.client.stats()
    config = front.config
    args = {**public_fields(config.engine), **public_fields(config), "served_model_name": front.model_name}
    del args["engine"]
    return {**args, "model_info": model_info(front), "internal_states": [stats], "version": _version()}


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request) -> dict[str, Any]:
    """Empty the prefix cache; a 400 while requests run or wait (SGLang's rule)."""
    answer = await front_state(request).client.flush_cache()
    if not answer.get("flushed"):
        raise APIError(400, str(answer.get("message", "the cache was not flushed")))
    return {"success": True, **answer}


@router.post("/concate_and_append_request")
async def concate_and_append_request(body: ConcateAndAppendReqInput, request: Request) -> dict[str, Any]:
    """SGLang's frontend calls this to join forked states (`fork` then `join(mode="concate_and_append")`).

    By then the frontend has joined the forks' text itself, and its next request carries that text. A
    server that kept each state's KV between requests would splice the forks' KV into the destination's
    (SGLang's "parallel encoding", approximate attention across the forks); this one keeps no KV between
    requests, so there is nothing to splice: the next request computes the joined text's KV exactly.
    """
    front_state(request).client.check_available()
    return {"success": True, "message": f"nothing to splice for {body.dst_rid}: this server keeps no KV between "
                                        "requests, so the next request computes the joined text exactly"}


@router.post("/abort_request")
async def abort_request(body: AbortReqInput, request: Request) -> dict[str, Any]:
    """Abort a request by rid (a batch's base rid aborts its items), or everything with abort_all."""
    client = front_state(request).client
    if not body.abort_all and not body.rid:
        raise APIError(400, "rid: give the rid to abort, or abort_all: true")
    in_flight = client.in_flight_rids()
    if body.abort_all:
        targets = in_flight
    else:
        targets = [body.rid] + [r for r in in_flight if r.startswith(body.rid + "_") and r != body.rid]
    for rid in targets:
        client.abort(rid, "aborted by /abort_request")
    return {"success": True, "aborted": [r for r in targets if r in in_flight]}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    front = front_state(request)
    if front.client.ready.is_set() and front.client.failure is None:
        try:
            await front.client.stats(timeout=5.0)
        except APIError:
            pass  # serve the last snapshot; the scrape itself must not fail
    return Response(front.metrics.render(), media_type=METRICS_CONTENT_TYPE)
