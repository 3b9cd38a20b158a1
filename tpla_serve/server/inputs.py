"""Turn a validated HTTP body into scheduler requests: tokenize, check, fan a batch out.

Everything that can be checked without running the model is checked here, before anything is queued,
so a bad item fails the whole batch with a 400 naming the field; the scheduler repeats the checks that
need its state (KV budget) and answers RequestError.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tpla_serve.sampling.parallel import copy_params, expand, parallel_samples
from tpla_serve.sampling.params import SamplingParams
from tpla_serve.server.errors import APIError
from tpla_serve.server.messages import GenerateRequest
from tpla_serve.server.protocol import PDFields

ROOM_RANGE = 1 << 63  # SGLang's router draws rooms as random non-negative 63-bit integers


def per_item(value: Any, n: int, name: str, batched: bool) -> list[Any]:
    """Broadcast a scalar field over a batch, or check a list has one entry per prompt."""
    if isinstance(value, list):
        if not batched:
            raise APIError(400, f"{name}: a list is given for a single prompt", param=name)
        if len(value) != n:
            raise APIError(400, f"{name}: {len(value)} entries for {n} prompts", param=name)
        return value
    return [value] * n


@dataclass(frozen=True)
class ItemOptions:
    """Per-request options of a (possibly batched) body, one list entry per prompt."""

    sampling_params: list[dict[str, Any] | None]
    return_logprob: list[bool]
    logprob_start_len: list[int]
    top_logprobs_num: list[int]
    return_text_in_logprobs: bool = False
    stream: bool = False


class InputProcessor:
    """The front's tokenizer plus the model limits the scheduler reported at start-up."""

    def __init__(self, tokenizer: Any | None, model_info: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size: int | None = model_info.get("vocab_size")
        self.context_length: int | None = model_info.get("context_length")

    def tokenize(self, text: str) -> list[int]:
        """As the offline Engine tokenizes a prompt (special tokens added by the tokenizer's rules)."""
        return list(self.require_tokenizer("text").encode(text))

    def require_tokenizer(self, field: str) -> Any:
        if self.tokenizer is None:
            raise APIError(400, f"{field}: this server runs without a tokenizer (--skip-tokenizer-init); "
                                "send input_ids", param=field)
        return self.tokenizer

    def check_ids(self, ids: Sequence[int], field: str) -> None:
        if not ids:
            raise APIError(400, f"{field}: the prompt is empty; give at least one token", param=field)
        for t in ids:
            if t < 0 or (self.vocab_size is not None and t >= self.vocab_size):
                bound = f"[0, {self.vocab_size})" if self.vocab_size is not None else ">= 0"
                raise APIError(400, f"{field}: token id {t} is outside the vocabulary {bound}", param=field)
        if self.context_length is not None and len(ids) >= self.context_length:
            raise APIError(
                400,
                f"{field}: the prompt has {len(ids)} tokens; this model's context length is "
                f"{self.context_length}, so at most {self.context_length - 1} prompt tokens fit",
                param=field,
            )

    def build(
        self,
        prompts: list[list[int]],
        options: ItemOptions,
        rid: str | list[str] | None,
        pd: PDFields,
        batched: bool,
        sampling_field: str | None = "sampling_params",
    ) -> list[GenerateRequest]:
        """One GenerateRequest per prompt, or with n > 1 per sample (tpla_serve.sampling.parallel: copy-major,
        so a caller answers a list whenever more than one request comes back). `sampling_field` prefixes
        sampling errors (None: the message's own field name stands alone, as for OpenAI bodies whose
        sampling fields are top-level)."""
        num_prompts = len(prompts)
        if num_prompts == 0:
            raise APIError(400, "the batch is empty")
        try:
            copies = parallel_samples(options.sampling_params)
        except ValueError as e:
            raise APIError(400, f"{sampling_field}: {e}" if sampling_field else str(e), param="n") from None
        total = num_prompts * copies
        rids = _rids(rid, num_prompts, copies, batched)
        hosts = _pd_items(pd.bootstrap_host, num_prompts, copies, "bootstrap_host", batched)
        ports = _pd_items(pd.bootstrap_port, num_prompts, copies, "bootstrap_port", batched)
        if total > 1 and pd.bootstrap_room is not None and not isinstance(pd.bootstrap_room, list):
            if batched:
                raise APIError(400, "bootstrap_room: a batch needs a list with one room per prompt")
            rooms = [(pd.bootstrap_room + k) % ROOM_RANGE for k in range(total)]  # SGLang's rule for n > 1
        else:
            rooms = _pd_items(pd.bootstrap_room, num_prompts, copies, "bootstrap_room", batched, offset=True)
        if total > 1 and len(set(r for r in rooms if r is not None)) < sum(r is not None for r in rooms):
            raise APIError(400, "bootstrap_room: each prompt and sample of a batch needs its own room")
        out = []
        for k, ids in enumerate(expand(prompts, copies)):
            i, copy = k % num_prompts, k // num_prompts
            if (hosts[k] is None) != (rooms[k] is None):
                raise APIError(400, "bootstrap_host and bootstrap_room come together: a PD request has both")
            try:
                params = SamplingParams.from_dict(copy_params(options.sampling_params[i], copy)).to_dict()
            except ValueError as e:
                raise APIError(400, f"{sampling_field}: {e}" if sampling_field else str(e)) from None
            start = options.logprob_start_len[i]
            if start >= len(ids):
                raise APIError(400, f"logprob_start_len: {start} is outside the prompt of {len(ids)} tokens")
            out.append(GenerateRequest(
                rid=rids[k],
                input_ids=list(ids),
                sampling_params=params,
                return_logprob=options.return_logprob[i],
                logprob_start_len=start,
                top_logprobs_num=options.top_logprobs_num[i],
                return_text_in_logprobs=options.return_text_in_logprobs,
                stream=options.stream,
                bootstrap_host=hosts[k],
                bootstrap_port=ports[k],
                bootstrap_room=rooms[k],
            ))
        return out


def _pd_items(
    value: Any, num_prompts: int, copies: int, name: str, batched: bool, offset: bool = False
) -> list[Any]:
    """A PD field per request: a scalar for every request; a list with one entry per request (as
    sglang-router sends for chat with n > 1), or per prompt, whose copies then share the entry (a room
    is shifted by the copy's number, so each sample has its own)."""
    total = num_prompts * copies
    if not isinstance(value, list):
        return [value] * total
    if not batched and copies == 1:
        raise APIError(400, f"{name}: a list is given for a single prompt", param=name)
    if len(value) == total:
        return value
    if len(value) != num_prompts:
        want = str(num_prompts)
        if copies > 1:
            want += f" (one per prompt) or {total} (one per sample)"
        raise APIError(400, f"{name}: {len(value)} entries, expected {want}", param=name)
    return [
        (v + k // num_prompts) % ROOM_RANGE if offset and v is not None else v
        for k, v in enumerate(expand(value, copies))
    ]


def _rids(rid: str | list[str] | None, num_prompts: int, copies: int, batched: bool) -> list[str]:
    total = num_prompts * copies
    if rid is None:
        return [uuid.uuid4().hex for _ in range(total)]
    if isinstance(rid, str):
        if not rid:
            raise APIError(400, "rid: must not be empty", param="rid")
        return [f"{rid}_{k}" for k in range(total)] if batched or copies > 1 else [rid]
    if not batched and copies == 1:
        raise APIError(400, "rid: a list is given for a single prompt", param="rid")
    if len(rid) == num_prompts and copies > 1:
        rids = [f"{r}_{k // num_prompts}" for k, r in enumerate(expand(rid, copies))]
    elif len(rid) == total:
        rids = list(rid)
    else:
        raise APIError(400, f"rid: {len(rid)} entries for {total} requests", param="rid")
    if any(not r for r in rid) or len(set(rids)) != total:
        raise APIError(400, "rid: a batch needs one distinct, non-empty rid per prompt", param="rid")
    return rids
