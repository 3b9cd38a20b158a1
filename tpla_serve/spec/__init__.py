"""Speculative decoding on the decode server; `verify` checks a draft block against the target."""

from tpla_serve.spec.verify import (
    VerifyOutput,
    VerifyUniforms,
    build_verify_batch,
    greedy_verify,
    processed_probs,
    speculative_verify,
)

__all__ = [
    "VerifyOutput",
    "VerifyUniforms",
    "build_verify_batch",
    "greedy_verify",
    "processed_probs",
    "speculative_verify",
]
