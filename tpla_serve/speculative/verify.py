"""Verification of a draft block against the target model: greedy and lossless speculative sampling.

A block is the target's forward over [last token, d_1..d_k]: row j of its logits is the target's
next-token distribution after d_1..d_j. Verification returns, per request, `accepted_len` a (how many
draft tokens are kept) and `tokens` [k+1] whose first a + 1 entries are emitted: d_1..d_a, then the
correction token (at the first rejection) or the bonus token (when all k are accepted). Entries past
a + 1 are -1.

Invariant: the emitted tokens are distributed exactly as tokens drawn one by one from the target's
processed distribution (Leviathan et al. 2023, Chen et al. 2023). Greedy verification emits exactly
the target's argmax sequence. This holds only when the draft tokens were drawn from the same draft
distributions q passed here, with randomness independent of the verifier's (the draft samples with
the sampler's (seed, step) stream; verification uses two other streams of the same seed).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple

import torch

from tpla_serve.sampling.params import SamplingParams
from tpla_serve.sampling.sampler import SamplingBatch, adjusted_logits, noise_bits, truncation_mask

_M32 = 0xFFFFFFFF
# Folded into the seed's high word so verification never reuses the noise the draft sampled with.
_ACCEPT_STREAM = 0x5BD1E995
_DRAW_STREAM = 0x27D4EB2F


class VerifyOutput(NamedTuple):
    accepted_len: torch.Tensor  # [B] int64, in [0, k]
    tokens: torch.Tensor  # [B, k+1] int64; the first accepted_len + 1 are emitted, the rest -1


class VerifyUniforms(NamedTuple):
    """The verifier's randomness: one acceptance uniform per draft position, one draw per block."""

    accept: torch.Tensor  # [B, k] in [0, 1)
    draw: torch.Tensor  # [B] in [0, 1)

    @classmethod
    def from_seeds(
        cls, seeds_lo: torch.Tensor, seeds_hi: torch.Tensor, first_steps: torch.Tensor, k: int
    ) -> VerifyUniforms:
        """Counter-based, as the sampler's noise: a pure function of (seed, step).

        `first_steps[b]` is the output index of the block's first token. Acceptance uniform i is keyed
        by step first_steps + i and the draw by first_steps; since every block emits at least one
        token, the next block starts past every uniform this block consumed, so none is used twice.
        """
        if not (seeds_lo.shape == seeds_hi.shape == first_steps.shape) or first_steps.dim() != 1:
            raise ValueError("seeds_lo, seeds_hi and first_steps must be [B] tensors of one shape")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        b = first_steps.shape[0]
        offsets = torch.arange(k, dtype=torch.int64, device=first_steps.device)
        steps = ((first_steps.unsqueeze(1) + offsets) & _M32).reshape(-1)
        accept_bits = noise_bits(
            seeds_lo.repeat_interleave(k), seeds_hi.repeat_interleave(k) ^ _ACCEPT_STREAM, steps, 1
        )
        draw_bits = noise_bits(seeds_lo, seeds_hi ^ _DRAW_STREAM, first_steps & _M32, 1)
        return cls(_to_unit(accept_bits).view(b, k), _to_unit(draw_bits).view(b))

    @classmethod
    def from_generator(
        cls, batch_size: int, k: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> VerifyUniforms:
        """Stateful randomness for tests and offline use."""
        u = torch.rand(batch_size, k + 1, dtype=torch.float64, generator=generator).to(device)
        return cls(u[:, :k], u[:, k])


def _to_unit(bits: torch.Tensor) -> torch.Tensor:
    """(bits + 0.5) / 2**32: exact in fp64, strictly inside (0, 1)."""
    return (bits.to(torch.float64) + 0.5) * 2.0**-32


# ---- distributions -------------------------------------------------------------------------------


def build_verify_batch(
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int]],
    seeds: Sequence[int],
    draft_tokens: Sequence[Sequence[int]],
    num_positions: int | Sequence[int],
    vocab_size: int,
    device: torch.device | str,
    eos_token_ids: Collection[int] = (),
) -> SamplingBatch:
    """A SamplingBatch of num_positions rows per request (one count for all, or one per request), row j
    of request b describing it after its draft prefix d_1..d_j: penalties, min_new_tokens and the step
    all see that prefix. Rows run request after request.

    num_positions = k + 1 for the target's block logits, k for the draft's.
    """
    if not (len(params) == len(output_ids) == len(seeds) == len(draft_tokens)):
        raise ValueError("params, output_ids, seeds and draft_tokens must have one entry per request")
    counts = [num_positions] * len(params) if isinstance(num_positions, int) else list(num_positions)
    if len(counts) != len(params):
        raise ValueError("num_positions must be one count, or one per request")
    if any(len(d) < n - 1 for d, n in zip(draft_tokens, counts)):
        raise ValueError("draft_tokens must hold at least num_positions - 1 tokens per request")
    rows = [(b, j) for b, n in enumerate(counts) for j in range(n)]
    return SamplingBatch.build(
        [params[b] for b, _ in rows],
        [list(output_ids[b]) + list(draft_tokens[b][:j]) for b, j in rows],
        [seeds[b] for b, _ in rows],
        vocab_size,
        device,
        eos_token_ids=eos_token_ids,
    )


def processed_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[N, V] float32: the distribution the sampler draws row i from, for logits [N, V].

    Penalties, the min_new_tokens stop mask, temperature and the joint top-k/top-p/min-p truncation,
    with the sampler's own functions; greedy rows are one-hot at the argmax of the penalized logits,
    so speculative verification of a greedy row reduces to greedy verification. Apply it to both the
    target's and the draft's logits: losslessness is relative to the distribution given as p.
    """
    if logits.dim() != 2 or logits.shape != (batch.batch_size, batch.vocab_size):
        raise ValueError(
            f"logits must be [N={batch.batch_size}, V={batch.vocab_size}], got {tuple(logits.shape)}"
        )
    adjusted = adjusted_logits(logits, batch)
    scaled = adjusted / batch.temperatures
    if batch.need_top_k or batch.need_top_p or batch.need_min_p:
        scaled = scaled.masked_fill(~truncation_mask(scaled, batch), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if batch.any_greedy:
        one_hot = torch.zeros_like(probs).scatter_(1, adjusted.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(batch.greedy.unsqueeze(1), one_hot, probs)
    return probs


# ---- verification --------------------------------------------------------------------------------


def _emit(draft_tokens: torch.Tensor, accepted_len: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[B, k+1]: the accepted drafts, then `last` at position accepted_len, then -1."""
    b, k = draft_tokens.shape
    tokens = torch.full((b, k + 1), -1, dtype=torch.int64, device=draft_tokens.device)
    pos = torch.arange(k + 1, device=draft_tokens.device).unsqueeze(0)
    tokens[:, :k] = torch.where(pos[:, :k] < accepted_len.unsqueeze(1), draft_tokens.long(), -1)
    return tokens.scatter_(1, accepted_len.unsqueeze(1), last.long().unsqueeze(1))


def greedy_verify(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, num_drafts: torch.Tensor | None = None
) -> VerifyOutput:
    """Accept the longest prefix of drafts equal to the target's argmax; then the argmax there.

    target_logits [B, k+1, V], draft_tokens [B, k]. The emitted tokens are exactly what greedy
    decoding of the target alone would produce. num_drafts [B] (default k): how many of a row's k
    drafts are real when a batch's blocks differ in length; the rest are padding, never accepted.
    """
    _check_block(target_logits, draft_tokens)
    argmax = target_logits.argmax(dim=-1)
    accepted_len = _clamp(_prefix_len(draft_tokens.long() == argmax[:, :-1]), num_drafts)
    last = argmax.gather(1, accepted_len.unsqueeze(1)).squeeze(1)
    return VerifyOutput(accepted_len, _emit(draft_tokens, accepted_len, last))


def accepted_lengths(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor, accept_u: torch.Tensor
) -> torch.Tensor:
    """[B]: the number of leading drafts accepted, draft i with probability min(1, p_i(d_i) / q_i(d_i)).

    Written as u * q < p so q = 0 needs no division (the ratio is then infinite: always accepted
    where p > 0); with p = 0 a draft is never accepted.
    """
    idx = draft_tokens.long().unsqueeze(-1)
    p = target_probs[:, :-1].gather(2, idx).squeeze(-1).double()
    q = draft_probs.gather(2, idx).squeeze(-1).double()
    return _prefix_len(accept_u.double() * q < p)


def correction_tokens(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    accepted_len: torch.Tensor,
    draw_u: torch.Tensor,
    num_drafts: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B]: the token at position accepted_len, drawn by inverse CDF with one uniform per row.

    After a rejection at position a < k it comes from norm(max(0, p_a - q_a)), the part of the
    target's mass the draft under-proposed; after all k (or a row's num_drafts) acceptances, from
    p_a itself (the bonus token). Where rounding leaves no residual mass (p_a == q_a), it falls
    back to p_a.
    """
    b, k1, v = target_probs.shape
    k = k1 - 1
    rows = torch.arange(b, device=target_probs.device)
    p = target_probs[rows, accepted_len].double()
    if k > 0:
        limit = num_drafts if num_drafts is not None else k
        q = draft_probs[rows, accepted_len.clamp(max=k - 1)].double()
        q = q * (accepted_len < limit).unsqueeze(1)
        residual = (p - q).clamp_(min=0.0)
        residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p)
    else:
        residual = p
    cdf = residual.cumsum(dim=1)
    target = draw_u.double().unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=v - 1)


def speculative_verify(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    uniforms: VerifyUniforms,
    num_drafts: torch.Tensor | None = None,
) -> VerifyOutput:
    """Standard speculative sampling with the bonus token.

    target_probs [B, k+1, V] (p_0..p_k), draft_probs [B, k, V] (q_0..q_{k-1}, the distributions d_1..d_k
    were drawn from), draft_tokens [B, k], all from `processed_probs`. The emitted tokens are
    distributed exactly as k' <= k + 1 tokens sampled from the target one at a time. num_drafts [B]
    (default k) marks a row's real drafts, as in greedy_verify.
    """
    _check_block(target_probs, draft_tokens)
    b, k = draft_tokens.shape
    if draft_probs.shape != (b, k, target_probs.shape[2]):
        raise ValueError(
            f"draft_probs must be [B={b}, k={k}, V={target_probs.shape[2]}], got {tuple(draft_probs.shape)}"
        )
    if uniforms.accept.shape != (b, k) or uniforms.draw.shape != (b,):
        raise ValueError(f"uniforms must be accept [B={b}, k={k}] and draw [B={b}]")
    accepted_len = _clamp(accepted_lengths(target_probs, draft_probs, draft_tokens, uniforms.accept), num_drafts)
    last = correction_tokens(target_probs, draft_probs, accepted_len, uniforms.draw, num_drafts)
    return VerifyOutput(accepted_len, _emit(draft_tokens, accepted_len, last))


def _clamp(accepted_len: torch.Tensor, num_drafts: torch.Tensor | None) -> torch.Tensor:
    return accepted_len if num_drafts is None else torch.minimum(accepted_len, num_drafts.to(accepted_len))


def _prefix_len(accepted: torch.Tensor) -> torch.Tensor:
    """[B] length of the leading run of True in each row of [B, k]."""
    return accepted.long().cumprod(dim=1).sum(dim=1)


def _check_block(target: torch.Tensor, draft_tokens: torch.Tensor) -> None:
    if target.dim() != 3 or draft_tokens.dim() != 2:
        raise ValueError(
            f"target must be [B, k+1, V] and draft_tokens [B, k], got {tuple(target.shape)}, "
            f"{tuple(draft_tokens.shape)}"
        )
    if target.shape[:2] != (draft_tokens.shape[0], draft_tokens.shape[1] + 1):
        raise ValueError(
            f"target {tuple(target.shape)} must be [B, k+1, V] for draft_tokens {tuple(draft_tokens.shape)}"
        )
