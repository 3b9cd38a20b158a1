"""The torch backend's decode of q queries per request (speculative blocks: verification, calibration) in
batched form, against attention written out per request and per query: query j of a request with prefix p
sees positions 0 .. p + j of its cache."""

from __future__ import annotations

import pytest
import torch

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.forward_batch import BatchEntry, ForwardMode, build_forward_batch
from tpla_serve.layers.attention.torch_backend import TorchAttentionBackend

HEADS, CKV, ROPE, PAGE = 4, 32, 16, 4


@pytest.mark.parametrize("prefixes,q_len", [([20, 0, 9], 3), ([5], 1), ([33, 2], 5)])
def test_query_blocks_match_attention_per_query(prefixes: list[int], q_len: int) -> None:
    gen = torch.Generator().manual_seed(q_len)
    pages_per = [-(-(p + q_len) // PAGE) for p in prefixes]
    pool = LatentKVPool(1, sum(pages_per) + 1, PAGE, CKV, ROPE, torch.float32, "cpu")
    pool.ckv[0].copy_(torch.randn(pool.ckv[0].shape, generator=gen))
    pool.kpe[0].copy_(torch.randn(pool.kpe[0].shape, generator=gen))
    order = (torch.randperm(pool.num_pages - 1, generator=gen) + 1).tolist()
    entries, start = [], 0
    for p, n in zip(prefixes, pages_per):
        entries.append(BatchEntry([0] * q_len, p, order[start : start + n], logits_for_all=True))
        start += n
    backend = TorchAttentionBackend()
    fb = build_forward_batch(ForwardMode.DECODE, entries, pool, backend, "cpu")
    # Head-major, as the absorbed queries come out of their per-head products: not contiguous.
    q_nope = torch.randn(HEADS, len(prefixes) * q_len, CKV, generator=gen).transpose(0, 1)
    q_pe = torch.randn(HEADS, len(prefixes) * q_len, ROPE, generator=gen).transpose(0, 1)
    scale, nope_scale = 0.3, 0.8
    out = backend.decode(q_nope, q_pe, 0, fb, scale, nope_scale)

    for b, e in enumerate(entries):
        for j in range(q_len):
            seen = e.prefix_len + j + 1
            slots = torch.tensor([e.pages[t // PAGE] * PAGE + t % PAGE for t in range(seen)])
            ckv, kpe = pool.read(0, slots)
            row = b * q_len + j
            logits = scale * (nope_scale * q_nope[row] @ ckv.T + q_pe[row] @ kpe.T)  # [H, seen]
            expected = torch.softmax(logits, dim=-1) @ ckv
            torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5)
