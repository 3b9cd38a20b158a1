"""What DONE carries of the prefill's logprobs, and what the decode makes of it: the request's input
logprobs exactly as the prefill recorded them, and its first output entry with the top-k."""

from __future__ import annotations

import pytest
import torch

from tpla_serve.disagg.messages import MAX_TOP_LOGPROBS
from tpla_serve.disagg.pd_logprobs import (
    check_top_logprobs,
    first_token_logprobs,
    prompt_from_wire,
    prompt_to_wire,
    top_to_wire,
)
from tpla_serve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from tpla_serve.engine.request import Request
from tpla_serve.sampling.params import SamplingParams

PROMPT = [5, 9, 2, 7, 4, 8]


class _Text:
    def decode(self, ids, **kwargs):
        return ""


def _prefill_request(start: int, top: int) -> Request:
    """A request whose prompt logprobs the prefill recorded, as the scheduler does, from random logits."""
    params = SamplingParams(max_new_tokens=1)
    checker = StopChecker(params, IncrementalDetokenizer.for_request(_Text(), params))
    req = Request(
        "r", list(PROMPT), params, checker, return_logprob=True, logprob_start_len=start, top_logprobs_num=top
    )
    logits = torch.randn(len(PROMPT), 16, generator=torch.Generator().manual_seed(start))
    req.record_prompt_logprobs(logits[:3], 0, 3)  # two chunks, as chunked prefill writes them
    req.record_prompt_logprobs(logits[3:], 3, len(PROMPT) - 3)
    return req


@pytest.mark.parametrize("start,top", [(0, 0), (0, 3), (2, 2), (5, 1)])
def test_prompt_logprobs_arrive_as_the_prefill_recorded_them(start, top):
    recorded = _prefill_request(start, top).input_logprobs
    wire = prompt_to_wire(recorded, start)
    assert wire.start == max(start, 1) and wire.top_k == top
    assert prompt_from_wire(wire, PROMPT, start) == recorded  # float32 both ways: exactly


def test_positions_that_disagree_with_the_request_are_refused():
    wire = prompt_to_wire(_prefill_request(2, 0).input_logprobs, 2)
    with pytest.raises(ValueError, match=r"positions \[2, 6\); the request asked for \[0, 6\)"):
        prompt_from_wire(wire, PROMPT, 0)
    with pytest.raises(ValueError, match="asked for"):
        prompt_from_wire(wire, PROMPT + [3], 2)


def test_first_token_entry_keeps_its_top_k():
    recorded = first_token_logprobs(7, -0.5, None)
    assert (recorded.token_ids, recorded.values, recorded.top_values) == ([7], [-0.5], [None])
    recorded.append(3, -1.0, [-0.25, -1.0], [9, 3])
    top = top_to_wire(recorded, 1)
    assert top is not None and top_to_wire(recorded, 0) is None
    entry = first_token_logprobs(3, -1.0, top)
    assert entry.top_values == [[-0.25, -1.0]] and entry.top_ids == [[9, 3]]


def test_what_done_cannot_carry_is_a_client_error():
    check_top_logprobs(MAX_TOP_LOGPROBS, 100, 0, 64 << 20)
    with pytest.raises(ValueError, match="^top_logprobs_num: at most"):
        check_top_logprobs(MAX_TOP_LOGPROBS + 1, 10, -1)
    with pytest.raises(ValueError, match="^top_logprobs_num: 20 over 99 prompt positions"):
        check_top_logprobs(20, 100, 0, 1000)
    check_top_logprobs(20, 100, 99, 1000)  # a later logprob_start_len fits
