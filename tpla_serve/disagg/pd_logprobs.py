"""The logprobs a PD decode's answer reports but only the prefill computes, in the form DONE carries them.

The prefill scores the prompt (SGLang's input logprobs from logprob_start_len on, with their top-k) and
samples the first output token (its logprob and top-k); DONE takes both to the decode, whose answer is
then complete by itself. The prefill's answer no longer carries the prompt's, so a router that prepends
the prefill's input logprobs to the decode's (SGLang's router does, ours too) gets every position once.
"""

from __future__ import annotations

import torch

from tpla_serve.disagg.messages import MAX_TOP_LOGPROBS, PromptLogprobs, TopLogprobs
from tpla_serve.sampling.logprobs import TokenLogprobs


def check_top_logprobs(
    top_logprobs_num: int, prompt_len: int, logprob_start_len: int, max_frame_bytes: int | None = None
) -> None:
    """What DONE can carry: at most MAX_TOP_LOGPROBS per position, the prompt's top-k in one frame."""
    if top_logprobs_num > MAX_TOP_LOGPROBS:
        raise ValueError(
            f"top_logprobs_num: at most {MAX_TOP_LOGPROBS} through prefill/decode disaggregation, "
            f"got {top_logprobs_num}"
        )
    prompt_positions = prompt_len - first_scored(logprob_start_len) if logprob_start_len >= 0 else 0
    frame = prompt_positions * top_logprobs_num * 4
    if max_frame_bytes is not None and frame > max_frame_bytes:
        raise ValueError(
            f"top_logprobs_num: {top_logprobs_num} over {prompt_positions} prompt positions is a {frame}-byte"
            f" frame, past this decode server's {max_frame_bytes}: ask for fewer or a later logprob_start_len"
        )


def first_scored(logprob_start_len: int) -> int:
    """The first prompt position with a logprob (position 0 has none: SGLang reports it as null)."""
    return max(logprob_start_len, 1)


def prompt_to_wire(lp: TokenLogprobs, logprob_start_len: int) -> PromptLogprobs:
    """A prefill request's prompt logprobs, from first_scored(logprob_start_len) on."""
    skip = 1 if logprob_start_len == 0 else 0  # the null entry of position 0
    tops = lp.top_values[skip:]
    k = len(tops[0]) if tops and tops[0] else 0
    return PromptLogprobs(
        start=first_scored(logprob_start_len),
        logprobs=torch.tensor(lp.values[skip:], dtype=torch.float32),
        top_logprobs=torch.tensor(tops, dtype=torch.float32) if k else None,
        top_ids=torch.tensor(lp.top_ids[skip:], dtype=torch.int32) if k else None,
    )


def prompt_from_wire(wire: PromptLogprobs, prompt_ids: list[int], logprob_start_len: int) -> TokenLogprobs:
    """The decode request's input logprobs; ValueError when they do not cover the positions it asked for."""
    start, n = wire.start, wire.logprobs.shape[0]
    if start != first_scored(logprob_start_len) or start + n != max(len(prompt_ids), start):
        raise ValueError(
            f"the prefill sent prompt logprobs of positions [{start}, {start + n}); the request asked for "
            f"[{logprob_start_len}, {len(prompt_ids)})"
        )
    out = TokenLogprobs()
    if logprob_start_len == 0:
        out.append(prompt_ids[0], None)
    ids = prompt_ids[start : start + n]
    if wire.top_logprobs is None or wire.top_ids is None:
        out.extend(TokenLogprobs.from_tensors(ids, wire.logprobs))
    else:
        out.extend(TokenLogprobs.from_tensors(ids, wire.logprobs, wire.top_logprobs, wire.top_ids))
    return out


def top_to_wire(lp: TokenLogprobs, i: int) -> TopLogprobs | None:
    """Position i's top-k, when it has one."""
    values, ids = lp.top_values[i], lp.top_ids[i]
    if not values or ids is None:
        return None
    return TopLogprobs(torch.tensor(values, dtype=torch.float32), torch.tensor(ids, dtype=torch.int32))


def first_token_logprobs(token: int, logprob: float | None, top: TopLogprobs | None) -> TokenLogprobs:
    """The decode request's first output logprobs entry, as the prefill sampled it."""
    out = TokenLogprobs()
    if top is None:
        out.append(token, logprob)
    else:
        out.append(token, logprob, top.logprobs.tolist(), top.ids.tolist())
    return out
