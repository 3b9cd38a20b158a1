"""The FlashInfer MLA backend's decode, eager and replayed from a CUDA graph, against the plain torch backend
at real shapes (GPU machine only)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from kernel_case import rel_err

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.engine.cuda_graph import StaticDecodeBatch
from tpla_serve.forward_batch import BatchEntry, ForwardMode, build_forward_batch
from tpla_serve.layers.attention import AttentionShape
from tpla_serve.layers.attention.torch_backend import TorchAttentionBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROPE = 64
SCALE = 1.0 / math.sqrt(192)  # DeepSeek's qk_head_dim, 128 + 64

# (batch, max context, heads, ckv, page_size, q_lens per request: an int for all, or "ragged", nope_scale)
CASES = [
    (1, 4096, 128, 512, 64, 1, 1.0),
    (16, 4096, 16, 512, 64, 1, 1.0),
    (16, 4096, 64, 512, 64, 1, 0.8),
    (1, 3000, 128, 512, 64, 5, 1.0),
    (16, 4096, 16, 512, 16, 5, 0.9),
    (16, 4096, 128, 512, 64, "ragged", 0.8),
    (16, 1024, 16, 512, 1, "ragged", 1.0),
]


@pytest.mark.parametrize("ckv", [256, 128])
def test_flashinfer_refuses_tpla_slices(ckv: int) -> None:
    """FlashInfer's Hopper MLA kernel faults at head_dim_ckv < 512: the backend refuses before running it."""
    pytest.importorskip("flashinfer", reason="flashinfer is not installed (pip install flashinfer-python)")
    from tpla_serve.layers.attention.flashinfer_backend import FlashInferAttentionBackend

    shape = AttentionShape(128, ckv, ROPE, 64, torch.bfloat16, SCALE)
    with pytest.raises(ValueError, match="head_dim_ckv"):
        FlashInferAttentionBackend(shape, torch.device("cuda"))


@pytest.mark.parametrize("batch,ctx,heads,ckv,page_size,q_lens,nope_scale", CASES)
def test_flashinfer_decode_matches_torch(
    batch: int, ctx: int, heads: int, ckv: int, page_size: int, q_lens: int | str, nope_scale: float
) -> None:
    pytest.importorskip("flashinfer", reason="flashinfer is not installed (pip install flashinfer-python)")
    from tpla_serve.layers.attention.flashinfer_backend import FlashInferAttentionBackend

    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    dtype, device = torch.bfloat16, torch.device("cuda")
    lens = [1 + int(x) for x in torch.randint(0, 5, (batch,), generator=gen)] if q_lens == "ragged" else [q_lens] * batch
    seq = [max(q, int(x)) for q, x in zip(lens, torch.randint(1, ctx + 1, (batch,), generator=gen))]
    seq[0] = ctx  # the longest context always appears
    pages_per = [-(-n // page_size) for n in seq]
    num_pages = sum(pages_per) + 1
    pool = LatentKVPool(1, num_pages, page_size, ckv, ROPE, dtype, device)
    pool.ckv[0].copy_(torch.randn(pool.ckv[0].shape, generator=gen))
    pool.kpe[0].copy_(torch.randn(pool.kpe[0].shape, generator=gen))
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    entries, start = [], 0
    for q, n, p in zip(lens, seq, pages_per):
        entries.append(BatchEntry([0] * q, n - q, order[start : start + p], logits_for_all=True))
        start += p
    backend = FlashInferAttentionBackend(AttentionShape(heads, ckv, ROPE, page_size, dtype, SCALE), device)
    fb = build_forward_batch(ForwardMode.DECODE, entries, pool, backend, device)
    q_nope = torch.randn(sum(lens), heads, ckv, generator=gen).to(device, dtype)
    q_pe = torch.randn(sum(lens), heads, ROPE, generator=gen).to(device, dtype)
    backend.prepare(fb)
    out = backend.decode(q_nope, q_pe, 0, fb, SCALE, nope_scale)
    again = backend.decode(q_nope, q_pe, 0, fb, SCALE, nope_scale)  # the plan is reused by later layers
    torch.cuda.synchronize()
    ref = TorchAttentionBackend().decode(q_nope, q_pe, 0, fb, SCALE, nope_scale)
    assert out.shape == q_nope.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), f"seed {seed}"
    assert rel_err(out, ref) < 1e-2, f"seed {seed}: q_lens {lens}, seq_lens {seq}"
    assert torch.equal(out, again), f"seed {seed}"


@pytest.mark.parametrize("heads", [16, 128])  # one CTA per cluster, and two (more than 64 packed query rows)
def test_flashinfer_decode_replayed_from_a_cuda_graph(heads: int) -> None:
    """A graph captured over the all-padding plan (every row one token on page 0), replayed after
    re-planning with other steps' lengths, long enough to split the KV, in batches that fill the graph or
    pad it. Decode of a step that was not planned is refused."""
    pytest.importorskip("flashinfer", reason="flashinfer is not installed (pip install flashinfer-python)")
    from tpla_serve.layers.attention.flashinfer_backend import FlashInferAttentionBackend

    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    dtype, device = torch.bfloat16, torch.device("cuda")
    bs, width, page_size, ckv, nope_scale = 8, 48, 64, 512, 0.9
    pool = LatentKVPool(1, 1 + bs * width, page_size, ckv, ROPE, dtype, device)
    pool.ckv[0].copy_(torch.randn(pool.ckv[0].shape, generator=gen))
    pool.kpe[0].copy_(torch.randn(pool.kpe[0].shape, generator=gen))
    backend = FlashInferAttentionBackend(AttentionShape(heads, ckv, ROPE, page_size, dtype, SCALE), device)
    static = StaticDecodeBatch(bs, width, pool, backend, device)
    q_nope = torch.zeros(bs, heads, ckv, dtype=dtype, device=device)
    q_pe = torch.zeros(bs, heads, ROPE, dtype=dtype, device=device)
    fb = static.planned_batch(bs, width, [1] * bs)
    backend.decode(q_nope, q_pe, 0, fb, SCALE, nope_scale)  # loads the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.decode(q_nope, q_pe, 0, fb, SCALE, nope_scale)
    for n in (bs, 5, 1):
        seq = [int(x) for x in torch.randint(1, width * page_size + 1, (n,), generator=gen)]
        seq[0] = width * page_size  # a full page table row
        order = (torch.randperm(bs * width, generator=gen) + 1).tolist()
        entries, start = [], 0
        for s in seq:
            pages = -(-s // page_size)
            entries.append(BatchEntry([0], s - 1, order[start : start + pages]))
            start += pages
        static.load(entries, bs, width)
        q_nope.copy_(torch.randn(q_nope.shape, generator=gen))
        q_pe.copy_(torch.randn(q_pe.shape, generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        ref_fb = build_forward_batch(ForwardMode.DECODE, entries, pool, backend, device)
        ref = TorchAttentionBackend().decode(q_nope[:n], q_pe[:n], 0, ref_fb, SCALE, nope_scale)
        assert rel_err(out[:n], ref) < 1e-2, f"seed {seed}: {n} requests, seq_lens {seq}"
    with pytest.raises(ValueError, match="not planned"):
        backend.decode(q_nope[:n], q_pe[:n], 0, ref_fb, SCALE, nope_scale)
