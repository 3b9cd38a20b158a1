"""The TP shard arithmetic of the layers, without process groups: the ranks' weight slices, loaded from one
full tensor, must reassemble the unsharded layer's output (concatenated for column splits, summed for
row splits)."""

from __future__ import annotations

import torch

from tpla_serve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from tpla_serve.layers.moe import MoEExperts
from tpla_serve.tpla.layout import ShardLayout

TP = 2


def _layouts() -> list[ShardLayout]:
    return [ShardLayout(tp_size=TP, tp_rank=r) for r in range(TP)]


def test_column_parallel_by_head_range() -> None:
    heads, head_dim = 4, 6
    w = torch.randn(heads * head_dim, 10, dtype=torch.float64)
    x = torch.randn(5, 10, dtype=torch.float64)
    parts = []
    for layout in _layouts():
        h0, h1 = layout.head_range(heads)
        layer = ColumnParallelLinear(
            10, heads * head_dim, layout, dtype=torch.float64, out_range=(h0 * head_dim, h1 * head_dim)
        )
        layer.weight.weight_loader(layer.weight, w)
        parts.append(layer(x))
    torch.testing.assert_close(torch.cat(parts, dim=-1), x @ w.T)


def test_merged_column_parallel_gate_up() -> None:
    gate, up = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    gates, ups = [], []
    for layout in _layouts():
        layer = MergedColumnParallelLinear(6, [8, 8], layout, dtype=torch.float64)
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)
        g, u = layer(x).chunk(2, dim=-1)
        gates.append(g)
        ups.append(u)
    torch.testing.assert_close(torch.cat(gates, -1), x @ gate.T)
    torch.testing.assert_close(torch.cat(ups, -1), x @ up.T)


def test_row_parallel_partial_sums() -> None:
    w = torch.randn(7, 12, dtype=torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    total = torch.zeros(4, 7, dtype=torch.float64)
    for layout in _layouts():
        layer = RowParallelLinear(12, 7, layout, dtype=torch.float64, reduce_results=False)
        layer.weight.weight_loader(layer.weight, w)
        start, end = layout.shard_range(12)
        total += layer(x[:, start:end])
    torch.testing.assert_close(total, x @ w.T)


def test_vocab_parallel_embedding_masks_foreign_tokens() -> None:
    w = torch.randn(10, 4, dtype=torch.float64)
    ids = torch.tensor([0, 4, 5, 9, 3])
    total = torch.zeros(5, 4, dtype=torch.float64)
    for layout in _layouts():
        layer = VocabParallelEmbedding(10, 4, layout, dtype=torch.float64)
        layer.weight.weight_loader(layer.weight, w)
        total += layer.local_embedding(ids)
    torch.testing.assert_close(total, w[ids])


def test_experts_split_intermediate_dimension() -> None:
    e, h, i = 4, 8, 12  # 6 units per rank at T=2: stored padded to 8
    gen = torch.Generator().manual_seed(0)
    full = MoEExperts(e, h, i, ShardLayout(), dtype=torch.float32)
    weights = {
        (x, p): torch.randn((h, i) if p == "down_proj" else (i, h), generator=gen)
        for x in range(e)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    for (x, p), w in weights.items():
        full.load_expert(w, x, p)
    x = torch.randn(9, h, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:2] for _ in range(9)])
    topk = torch.rand(9, 2, generator=gen)
    total = torch.zeros(9, h)
    for layout in _layouts():
        shard = MoEExperts(e, h, i, layout, dtype=torch.float32)
        for (xid, p), w in weights.items():
            shard.load_expert(w, xid, p)
        total += shard(x, topk, ids)
    torch.testing.assert_close(total, full(x, topk, ids), rtol=1e-5, atol=1e-5)
