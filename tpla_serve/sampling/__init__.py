"""Sampling: request parameters, the batched sampler, penalties and logprob formatting."""

from tpla_serve.sampling.logprobs import (
    TokenLogprobs,
    format_token_logprobs,
    format_top_logprobs,
    token_logprobs,
)
from tpla_serve.sampling.params import SamplingParams
from tpla_serve.sampling.sampler import Sampler, SamplerOutput, SamplingBatch, resolve_seed

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingBatch",
    "SamplingParams",
    "TokenLogprobs",
    "format_token_logprobs",
    "format_top_logprobs",
    "resolve_seed",
    "token_logprobs",
]
