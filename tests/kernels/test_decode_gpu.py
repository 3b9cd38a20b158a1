"""Compiled Triton kernels on a CUDA device at real shapes: fresh random inputs, poisoned outputs."""

from __future__ import annotations

import math
import os

import pytest
import torch
from kernel_case import make_paged_case, rel_err

from tpla_kernels.decode import mla_decode
from tpla_kernels.hadamard import hadamard_transform, hadamard_transform_reference
from tpla_kernels.reference import mla_decode_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _fresh_generator() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


# (seq_lens, heads, q_len, ckv, page_size, dtype, num_kv_splits, nope_scale)
GPU_CASES = [
    ([4096, 1500, 77, 8191], 64, 1, 512, 64, torch.bfloat16, None, 1.0),
    ([4096, 2900, 300, 6000, 1], 128, 1, 256, 64, torch.bfloat16, None, 0.85),
    ([5000, 33, 2047], 128, 1, 128, 64, torch.bfloat16, None, 1.2),
    ([3000, 1200], 16, 4, 512, 16, torch.bfloat16, None, 1.0),
    ([2500, 900, 4000], 64, 2, 256, 1, torch.float16, 7, 0.9),
    ([1024] * 40, 128, 1, 256, 64, torch.bfloat16, 1, 1.0),
    ([700, 2000], 32, 3, 128, 64, torch.float32, 4, 1.0),
]


@pytest.mark.parametrize("seq_lens,heads,q_len,ckv,page_size,dtype,splits,nope_scale", GPU_CASES)
def test_decode_gpu_matches_reference(
    seq_lens: list[int], heads: int, q_len: int, ckv: int, page_size: int, dtype: torch.dtype,
    splits: int | None, nope_scale: float,
) -> None:
    gen, seed = _fresh_generator()
    case = make_paged_case(seq_lens, heads, q_len, ckv, page_size, dtype, device="cuda", generator=gen)
    sm_scale = 1.0 / math.sqrt(192)
    out = torch.full_like(case.q_nope, float("nan"))
    res, lse = mla_decode(*case, sm_scale, q_len=q_len, nope_scale=nope_scale, num_kv_splits=splits, out=out)
    torch.cuda.synchronize()
    ref_out, ref_lse = mla_decode_reference(*case, sm_scale, q_len=q_len, nope_scale=nope_scale)
    assert res.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all(), f"seed {seed}: unwritten or non-finite outputs"
    assert rel_err(out, ref_out) < 1e-2, f"seed {seed}"
    assert (lse - ref_lse).abs().max().item() < 5e-3, f"seed {seed}"


def test_decode_gpu_cuda_graph_replay() -> None:
    """Captured once, replayed on new contents of the same buffers (as the engine's decode graphs do)."""
    gen, seed = _fresh_generator()
    static = make_paged_case([3072] * 4, 128, 1, 256, 64, torch.bfloat16, device="cuda", generator=gen)
    out = torch.empty_like(static.q_nope)
    mla_decode(*static, 0.07, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse = mla_decode(*static, 0.07, out=out)
    for lens in ([2500, 3000, 1, 64], [0, 900, 3072, 2000]):
        fresh = make_paged_case(lens, 128, 1, 256, 64, torch.bfloat16, device="cuda", generator=gen)
        static.q_nope.copy_(fresh.q_nope)
        static.q_pe.copy_(fresh.q_pe)
        static.ckv_cache[: fresh.ckv_cache.shape[0]].copy_(fresh.ckv_cache)
        static.kpe_cache[: fresh.kpe_cache.shape[0]].copy_(fresh.kpe_cache)
        static.page_table.fill_(-1)
        static.page_table[:, : fresh.page_table.shape[1]].copy_(fresh.page_table)
        static.seq_lens.copy_(fresh.seq_lens)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = mla_decode_reference(*static, 0.07)
        assert rel_err(out, ref_out) < 1e-2, f"seed {seed}"
        live = static.seq_lens > 0
        assert (lse[live] - ref_lse[live]).abs().max().item() < 5e-3, f"seed {seed}"
        assert torch.isneginf(lse[~live]).all() and (out[~live] == 0).all()


@pytest.mark.parametrize("n,dtype", [(512, torch.bfloat16), (1024, torch.float32), (64, torch.float16)])
def test_hadamard_gpu_matches_reference(n: int, dtype: torch.dtype) -> None:
    gen, seed = _fresh_generator()
    x = torch.randn(3000, n, generator=gen).to(dtype).cuda()
    out = torch.full_like(x, float("nan"))
    hadamard_transform(x, out=out)
    ref = hadamard_transform_reference(x)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2), f"seed {seed}"
