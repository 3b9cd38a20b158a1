"""The CUDA-graph-capturable routed-expert path equals the sort-and-dispatch path."""

from __future__ import annotations

import pytest
import torch

from tpla_serve.layers.moe import MoEExperts
from tpla_serve.tpla.layout import ShardLayout


@pytest.mark.parametrize("tokens,top_k,dtype", [(1, 2, torch.float32), (5, 3, torch.float32), (4, 2, torch.bfloat16)])
def test_gathered_experts_match_dispatch(tokens: int, top_k: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(tokens * 10 + top_k)
    experts = MoEExperts(8, 32, 24, ShardLayout(), dtype=dtype)
    with torch.no_grad():
        experts.w13.copy_(torch.randn(experts.w13.shape, generator=gen) * 0.2)
        experts.w2.copy_(torch.randn(experts.w2.shape, generator=gen) * 0.2)
    x = torch.randn(tokens, 32, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(8, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    out = experts.forward_gathered(x, weights, ids)
    ref = experts(x, weights, ids)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
