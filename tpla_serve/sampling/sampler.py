"""Batched next-token sampling on fp32 logits [B, V], without host syncs on the device path.

Pipeline per step (SGLang's order): penalties -> min_new_tokens stop-token mask -> grammar bitmask ->
temperature -> top-k / top-p / min-p truncation (joint, all measured on the untruncated softmax) -> draw.
Greedy rows (temperature 0) take the exact argmax of the penalized logits.

Randomness is counter-based, as in SGLang's seeded sampler: the noise for token v of a row is a hash
of (request seed, step, v), turned into an Exp(1) variate for an exponential race
(argmax_v p_v / E_v, which draws v with probability p_v). There is no generator state: the same seed,
step and logits give the same token whatever else is in the batch, on CPU and GPU alike (barring
floating-point near-ties), and a decode server continues a prefill server's request without
receiving any RNG state. On CUDA the hash, noise and argmax run as one Triton kernel.

Logprobs follow SGLang: log_softmax of the penalized logits divided by the request's temperature
(1 for greedy rows), before top-k/top-p/min-p truncation; `return_original_logprob=True` gives them
before temperature (SGLang's SGLANG_RETURN_ORIGINAL_LOGPROB). Values are clamped to the fp32 minimum
so masked tokens stay JSON-encodable.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tpla_serve.sampling.bitmask import TokenBitmask
from tpla_serve.sampling.logprobs import TokenLogprobs
from tpla_serve.sampling.params import SamplingParams
from tpla_serve.sampling.penalties import PenaltyInputs, StopTokenMask, apply_penalties, host_to_device

_M32 = 0xFFFFFFFF
_LOGPROB_MIN = torch.finfo(torch.float32).min


def resolve_seed(params: SamplingParams) -> int:
    """The seed a request samples with: its own, else a fresh random one (drawn once per request)."""
    return params.sampling_seed if params.sampling_seed is not None else secrets.randbits(64)


# ---- counter-based noise (murmur3-style 32-bit mixing, in int64 so nothing overflows) ----------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32): the constant is split in 16-bit halves so every
    intermediate product stays below 2**48."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _M32


def _scramble(k: torch.Tensor) -> torch.Tensor:
    return _mul32(_rotl32(_mul32(k, 0xCC9E2D51), 15), 0x1B873593)


def _absorb(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return (_rotl32(h ^ _scramble(k), 13) * 5 + 0xE6546B64) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def noise_bits(
    seeds_lo: torch.Tensor, seeds_hi: torch.Tensor, steps: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """[B, V] int64 in [0, 2**32): a pure function of (seed, step, token id) per element."""
    row = _absorb(_absorb(_absorb(torch.zeros_like(seeds_lo), seeds_lo), seeds_hi), steps)
    col = _scramble(torch.arange(vocab_size, dtype=torch.int64, device=steps.device))
    h = (_rotl32(row.unsqueeze(1) ^ col.unsqueeze(0), 13) * 5 + 0xE6546B64) & _M32
    return _fmix32(h ^ 16)


def gumbel_noise(
    seeds_lo: torch.Tensor, seeds_hi: torch.Tensor, steps: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """[B, V] float64 Gumbel(0, 1) noise: -log(E) with E = -log(u) ~ Exp(1).

    Adding it to logits and taking the argmax is the exponential race. u = (bits + 0.5) / 2**32 is
    exact in fp64 and never 0 or 1, so the noise is always finite.
    """
    u = (noise_bits(seeds_lo, seeds_hi, steps, vocab_size).to(torch.float64) + 0.5) * 2.0**-32
    return -torch.log(-torch.log(u))


def gumbel_argmax(
    scaled: torch.Tensor, seeds_lo: torch.Tensor, seeds_hi: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    """argmax(scaled + gumbel_noise) per row: one fused kernel on CUDA, the torch definition elsewhere."""
    if scaled.is_cuda:
        from tpla_serve.sampling.gumbel_triton import gumbel_argmax_cuda

        return gumbel_argmax_cuda(scaled, seeds_lo, seeds_hi, steps)
    noise = gumbel_noise(seeds_lo, seeds_hi, steps, scaled.shape[1])
    return (scaled.to(torch.float64) + noise).argmax(dim=-1)


# ---- per-step batch description ------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingBatch:
    """Everything the sampler needs for one step of B rows, built on the host and moved to the
    device once. The host-side flags let the sampler skip whole stages without reading the device."""

    temperatures: torch.Tensor  # [B, 1] float32; 1.0 on greedy rows
    top_ps: torch.Tensor  # [B, 1] float32
    top_ks: torch.Tensor  # [B, 1] int64; vocab_size where disabled
    min_ps: torch.Tensor  # [B, 1] float32
    greedy: torch.Tensor  # [B] bool
    seeds_lo: torch.Tensor  # [B] int64, low 32 bits of the seed
    seeds_hi: torch.Tensor  # [B] int64, high 32 bits
    steps: torch.Tensor  # [B] int64, output index of the token being sampled
    penalties: PenaltyInputs | None
    stop_mask: StopTokenMask | None
    is_all_greedy: bool
    any_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    max_top_k: int  # largest enabled top_k (0 when none)
    top_p_within_top_k: bool  # every sampling row with top_p < 1 also has a top_k
    vocab_size: int
    grammar_mask: TokenBitmask | None = None  # the tokens constrained rows may take this step

    @property
    def batch_size(self) -> int:
        return self.greedy.shape[0]

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        seeds: Sequence[int],
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: Collection[int] = (),
        steps: Sequence[int] | None = None,
    ) -> SamplingBatch:
        """Row i samples request `params[i]` whose generated tokens so far are `output_ids[i]`.

        `seeds[i]` comes from `resolve_seed` (fixed for the request's lifetime). `steps[i]`, the output
        index of the token being sampled, defaults to len(output_ids[i]); pass it explicitly when several
        rows belong to one request (draft verification) or tokens are still in flight (overlap). `eos_token_ids` are the model's EOS ids, masked with each request's
        stop_token_ids while it is short of min_new_tokens.
        """
        device = torch.device(device)
        n = len(params)
        if not (len(output_ids) == len(seeds) == n) or (steps is not None and len(steps) != n):
            raise ValueError("params, output_ids, seeds and steps must have one entry per row")
        if steps is None:
            steps = [len(ids) for ids in output_ids]
        greedy = [p.is_greedy for p in params]
        sampling = [p for p, g in zip(params, greedy) if not g]
        top_ks = [p.top_k if (p.top_k != -1 and p.top_k < vocab_size) else vocab_size for p in params]
        enabled_k = [k for k, g in zip(top_ks, greedy) if not g and k < vocab_size]

        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        penalties = None
        if pen_rows:
            penalties = PenaltyInputs.build(
                pen_rows,
                [output_ids[i] for i in pen_rows],
                [params[i].frequency_penalty for i in pen_rows],
                [params[i].presence_penalty for i in pen_rows],
                [params[i].repetition_penalty for i in pen_rows],
                vocab_size,
                device,
            )
        eos = sorted({int(t) for t in eos_token_ids})
        short = [i for i, p in enumerate(params) if steps[i] < p.min_new_tokens]
        stop_mask = None
        if short:
            token_sets = [sorted(set(params[i].stop_token_ids).union(eos)) for i in short]
            if any(token_sets):
                stop_mask = StopTokenMask.build(short, token_sets, device)

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return host_to_device(values, dtype, device).unsqueeze(1)

        return cls(
            temperatures=column([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32),
            top_ps=column([p.top_p for p in params], torch.float32),
            top_ks=column(top_ks, torch.int64),
            min_ps=column([p.min_p for p in params], torch.float32),
            greedy=host_to_device(greedy, torch.bool, device),
            seeds_lo=host_to_device([s & _M32 for s in seeds], torch.int64, device),
            seeds_hi=host_to_device([(s >> 32) & _M32 for s in seeds], torch.int64, device),
            steps=host_to_device([s & _M32 for s in steps], torch.int64, device),
            penalties=penalties,
            stop_mask=stop_mask,
            is_all_greedy=not sampling,
            any_greedy=any(greedy),
            need_top_k=bool(enabled_k),
            need_top_p=any(p.top_p < 1.0 for p in sampling),
            need_min_p=any(p.min_p > 0.0 for p in sampling),
            max_top_k=max(enabled_k, default=0),
            vocab_size=vocab_size,
            top_p_within_top_k=all(
                k < vocab_size for p, k in zip(params, top_ks) if not p.is_greedy and p.top_p < 1.0
            ),
        )


class SamplerOutput(NamedTuple):
    """Device tensors; `tolist` is the step's single host transfer."""

    next_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, logprob of the chosen token
    top_logprobs_vals: torch.Tensor | None  # [B, max k] float32, descending
    top_logprobs_ids: torch.Tensor | None  # [B, max k] int64
    top_logprobs_nums: tuple[int, ...] | None  # k per row

    def tolist(self) -> tuple[list[int], TokenLogprobs | None]:
        """(token ids, their logprobs when computed), the top-k lists cut to each row's own k."""
        ids = self.next_token_ids.tolist()
        if self.logprobs is None:
            return ids, None
        if self.top_logprobs_nums is None:
            return ids, TokenLogprobs.from_tensors(ids, self.logprobs)
        return ids, TokenLogprobs.from_tensors(
            ids, self.logprobs, self.top_logprobs_vals, self.top_logprobs_ids, self.top_logprobs_nums
        )


def adjusted_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """fp32 logits after the batch's penalties, its stop-token mask (min_new_tokens) and its grammar
    bitmask; the input is not modified. The sampler and speculative verification both start from these."""
    logits = logits.float()
    if batch.penalties is not None or batch.stop_mask is not None or batch.grammar_mask is not None:
        logits = logits.clone()
        if batch.penalties is not None:
            apply_penalties(logits, batch.penalties)
        if batch.stop_mask is not None:
            batch.stop_mask.apply(logits)
        if batch.grammar_mask is not None:
            batch.grammar_mask.apply(logits)
    return logits


class Sampler:
    """Stateless; one instance per model runner."""

    def __init__(self, return_original_logprob: bool = False) -> None:
        self.return_original_logprob = return_original_logprob

    def __call__(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        return_logprob: bool = False,
        top_logprobs_nums: Sequence[int] | None = None,
    ) -> SamplerOutput:
        """Sample one token per row of `logits` [B, V]. The caller's logits are not modified.

        `top_logprobs_nums[i]` (k per row, 0 for none) asks for the k most likely tokens' logprobs.
        """
        if logits.dim() != 2 or logits.shape != (batch.batch_size, batch.vocab_size):
            raise ValueError(
                f"logits must be [B={batch.batch_size}, V={batch.vocab_size}], got {tuple(logits.shape)}"
            )
        if top_logprobs_nums is not None and len(top_logprobs_nums) != batch.batch_size:
            raise ValueError("top_logprobs_nums must have one entry per row")
        logits = adjusted_logits(logits, batch)

        max_k = max(top_logprobs_nums, default=0) if top_logprobs_nums is not None else 0
        full = self._full_logprobs(logits, batch) if return_logprob or max_k > 0 else None
        if batch.is_all_greedy:
            next_ids = logits.argmax(dim=-1)
        else:
            next_ids = self._draw(logits / batch.temperatures, batch)
            if batch.any_greedy:
                next_ids = torch.where(batch.greedy, logits.argmax(dim=-1), next_ids)
        return self._pack(next_ids, full, return_logprob, top_logprobs_nums, max_k)

    def score(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        token_ids: torch.Tensor,
        top_logprobs_nums: Sequence[int] | None = None,
    ) -> SamplerOutput:
        """Logprobs of tokens chosen elsewhere (speculative verification), as __call__ reports them."""
        if logits.shape != (batch.batch_size, batch.vocab_size) or token_ids.shape != (batch.batch_size,):
            raise ValueError(
                f"logits must be [B={batch.batch_size}, V={batch.vocab_size}] and token_ids [B], got "
                f"{tuple(logits.shape)} and {tuple(token_ids.shape)}"
            )
        max_k = max(top_logprobs_nums, default=0) if top_logprobs_nums is not None else 0
        full = self._full_logprobs(adjusted_logits(logits, batch), batch)
        return self._pack(token_ids.long(), full, True, top_logprobs_nums, max_k)

    def _full_logprobs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """log_softmax over the adjusted logits, after temperature unless return_original_logprob."""
        if batch.is_all_greedy or self.return_original_logprob:
            return torch.log_softmax(logits, dim=-1)
        return torch.log_softmax(logits / batch.temperatures, dim=-1)

    @staticmethod
    def _draw(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if batch.need_top_k or batch.need_top_p or batch.need_min_p:
            scaled = scaled.masked_fill(~truncation_mask(scaled, batch), float("-inf"))
        return gumbel_argmax(scaled, batch.seeds_lo, batch.seeds_hi, batch.steps)

    @staticmethod
    def _pack(
        next_ids: torch.Tensor,
        full: torch.Tensor | None,
        return_logprob: bool,
        top_logprobs_nums: Sequence[int] | None,
        max_k: int,
    ) -> SamplerOutput:
        logprobs = top_vals = top_ids = None
        if full is not None:
            full = full.clamp(min=_LOGPROB_MIN)
            if return_logprob:
                logprobs = full.gather(1, next_ids.unsqueeze(1)).squeeze(1)
            if max_k > 0:
                top_vals, top_ids = full.topk(max_k, dim=-1)
        nums = tuple(top_logprobs_nums) if top_vals is not None and top_logprobs_nums is not None else None
        return SamplerOutput(next_ids, logprobs, top_vals, top_ids, nums)


def truncation_mask(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B, V] bool, True for tokens top-k, top-p and min-p all keep.

    All three are measured on softmax(scaled) before any of them is applied (SGLang's joint order):
    top-p keeps a token if the mass strictly before it in descending order is <= top_p, so the most
    likely token is always kept; min-p keeps tokens with p >= min_p * p_max. When every top-p row also
    has a top-k, only the top max_top_k entries can survive, so a top-k replaces the full sort.
    Greedy rows' masks are meaningless (their token is the argmax).
    """
    keep = torch.ones_like(scaled, dtype=torch.bool)
    probs = torch.softmax(scaled, dim=-1) if batch.need_min_p or batch.need_top_p else None
    if probs is not None and batch.need_min_p:
        keep &= probs >= batch.min_ps * probs.amax(dim=-1, keepdim=True)
    if probs is not None and batch.need_top_p:
        if batch.top_p_within_top_k:
            sorted_p, order = probs.topk(batch.max_top_k, dim=-1)
        else:
            sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        keep_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) <= batch.top_ps
        if batch.need_top_k:
            ranks = torch.arange(sorted_p.shape[1], device=probs.device).unsqueeze(0)
            keep_sorted &= ranks < batch.top_ks
        kept = torch.zeros_like(keep).scatter_(1, order, keep_sorted)
        if batch.top_p_within_top_k:  # rows with neither top-k nor top-p keep everything
            kept |= (batch.top_ks >= scaled.shape[1]) & (batch.top_ps >= 1.0)
        keep &= kept
    elif batch.need_top_k:
        top = scaled.topk(batch.max_top_k, dim=-1).values
        kth = top.gather(1, batch.top_ks.clamp(max=batch.max_top_k) - 1)
        kth = torch.where(batch.top_ks >= scaled.shape[1], torch.full_like(kth, float("-inf")), kth)
        keep &= scaled >= kth
    return keep
