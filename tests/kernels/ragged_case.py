"""A DECODE step whose requests verify different numbers of tokens, built identically in any process."""

from __future__ import annotations

import torch

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.forward_batch import BatchEntry, ForwardMode, build_forward_batch
from tpla_serve.layers.attention import create_attention_backend

HEADS, ROPE = 4, 64


def ragged_decode(
    backend: str, seed: int, requests: list[tuple[int, int]], ckv: int, page_size: int, dtype: torch.dtype,
    nope_scale: float,
) -> torch.Tensor:
    """Output [N, H, ckv] of one layer's decode for requests (prefix_len, q_len), on random cache and queries.

    Everything random comes from `seed`, so two processes (one running Triton's interpreter) see the same step.
    """
    gen = torch.Generator().manual_seed(seed)
    pages_per = [-(-(p + q) // page_size) for p, q in requests]
    num_pages = sum(pages_per) + 2
    pool = LatentKVPool(1, num_pages, page_size, ckv, ROPE, dtype, "cpu")
    pool.ckv[0].copy_(torch.randn(pool.ckv[0].shape, generator=gen))
    pool.kpe[0].copy_(torch.randn(pool.kpe[0].shape, generator=gen))
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()  # page 0 stays reserved
    entries, start = [], 0
    for (prefix, q_len), n in zip(requests, pages_per):
        entries.append(BatchEntry([0] * q_len, prefix, order[start : start + n], logits_for_all=True))
        start += n
    attn = create_attention_backend("torch" if backend == "torch" else "auto", "cpu")
    fb = build_forward_batch(ForwardMode.DECODE, entries, pool, attn, "cpu")
    n_tokens = sum(q for _, q in requests)
    q_nope = torch.randn(n_tokens, HEADS, ckv, generator=gen).to(dtype)
    q_pe = torch.randn(n_tokens, HEADS, ROPE, generator=gen).to(dtype)
    if backend == "triton":
        from tpla_serve.layers.attention.triton_backend import TritonAttentionBackend

        attn = TritonAttentionBackend()
        fb.attn_backend = attn
    attn.prepare(fb)
    return attn.decode(q_nope, q_pe, 0, fb, 1.0 / (ckv + ROPE) ** 0.5, nope_scale)
