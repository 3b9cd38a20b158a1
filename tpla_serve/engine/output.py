"""A request's state as the SGLang-shaped dict that /generate and Engine.generate return."""

from __future__ import annotations

from typing import Any

from tpla_serve.engine.request import Request


def request_output(
    req: Request, tokenizer: Any | None, return_text_in_logprobs: bool = False, streaming: bool = False
) -> dict[str, Any]:
    """`text` is cumulative; while streaming, a tail that may still become a stop string is held back."""
    text = req.checker.stream_text() if streaming else req.checker.text
    meta: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": req.finish_reason,
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
    }
    if req.finish_time is not None:
        meta["e2e_latency"] = req.finish_time - req.arrival_time
    if req.speculative:
        verifies, proposed = req.spec_verify_ct, req.spec_num_proposed_drafts
        meta["spec_verify_ct"] = verifies
        meta["spec_num_proposed_drafts"] = proposed
        meta["spec_num_correct_drafts"] = req.spec_num_correct_drafts
        meta["spec_accept_rate"] = req.spec_num_correct_drafts / proposed if proposed else 0.0
        # Tokens per verification step; the first output token comes from prefill, not from a block.
        meta["spec_accept_length"] = (len(req.output_ids) - 1) / verifies if verifies else 0.0
    if req.return_logprob:
        decoder = tokenizer if return_text_in_logprobs else None
        meta["input_token_logprobs"] = req.input_logprobs.formatted(decoder)
        meta["output_token_logprobs"] = req.output_logprobs.formatted(decoder)
        meta["output_token_logprobs_length"] = len(meta["output_token_logprobs"])
        if req.top_logprobs_num:
            meta["input_top_logprobs"] = req.input_logprobs.formatted_top(decoder)
            meta["output_top_logprobs"] = req.output_logprobs.formatted_top(decoder)
    return {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}
