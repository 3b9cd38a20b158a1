"""Speculative decoding on the decode server; `verify` checks a draft block against the target."""

from tpla_serve.speculative.verify import (
    VerifyOutput,
    VerifyUniforms,
    accepted_lengths,
    build_verify_batch,
    correction_tokens,
    greedy_verify,
    processed_probs,
    speculative_verify,
)

__all__ = [
    "VerifyOutput",
    "VerifyUniforms",
    "accepted_lengths",
    "build_verify_batch",
    "correction_tokens",
    "greedy_verify",
    "processed_probs",
    "speculative_verify",
]
