"""Linear and embedding layers that know their tensor-parallel shard.

Each parameter carries a `weight_loader` that takes the *full* checkpoint tensor (or a lazy view of it),
checks its shape and copies in only this rank's slice, so a checkpoint never has to be materialized
whole. The shard arithmetic lives in ShardLayout; the layers only say which dimension is split.
With tp_size = 1 every layer is a plain nn.Linear / nn.Embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tpla_serve.tpla.layout import ShardLayout


class WeightSource(Protocol):
    """A checkpoint tensor that may not be in memory yet: torch.Tensor satisfies it, and so does the
    loader's lazy safetensors view, which reads only the rows/columns asked for."""

    @property
    def shape(self) -> Sequence[int]: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...


def _check_shape(src: WeightSource, expected: Sequence[int]) -> None:
    if tuple(src.shape) != tuple(expected):
        raise ValueError(f"shape {list(src.shape)} does not match the expected {list(expected)}")


def load_slice(dst: torch.Tensor, src: WeightSource, full_shape: Sequence[int], dim: int, start: int) -> None:
    """Copy src's slice [start, start + dst.shape[dim]) along `dim` into dst; checks src's full shape."""
    _check_shape(src, full_shape)
    with torch.no_grad():
        dst.copy_(src.narrow(dim, start, dst.shape[dim]))


def load_full(dst: torch.Tensor, src: WeightSource) -> None:
    load_slice(dst, src, dst.shape, 0, 0)


def tp_all_reduce(x: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """Sum partial results over the TP ranks (identity on one rank)."""
    if layout.tp_size == 1:
        return x
    dist.all_reduce(x)
    return x


def tp_all_gather(x: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """Concatenate the ranks' shards along the last dimension (identity on one rank)."""
    if layout.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(layout.tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def _param(*shape: int, dtype: torch.dtype | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class ReplicatedLinear(nn.Module):
    """Every rank holds the whole weight [out, in] (small projections, routers)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.weight.weight_loader = load_full  # type: ignore[attr-defined]
        self.bias = _param(out_features, dtype=dtype) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = load_full  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output features split over ranks: this rank keeps rows out_range = [start, end) of the weight.

    out_range defaults to an even split over all ranks; attention passes its head range instead.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        layout: ShardLayout,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        out_range: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out_start, out_end = out_range if out_range is not None else layout.shard_range(out_features)
        local = out_end - self.out_start
        self.weight = _param(local, in_features, dtype=dtype)
        self.weight.weight_loader = self._load_weight  # type: ignore[attr-defined]
        self.bias = _param(local, dtype=dtype) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self._load_bias  # type: ignore[attr-defined]

    def _load_weight(self, param: torch.Tensor, src: WeightSource) -> None:
        load_slice(param, src, (self.out_features, self.in_features), 0, self.out_start)

    def _load_bias(self, param: torch.Tensor, src: WeightSource) -> None:
        load_slice(param, src, (self.out_features,), 0, self.out_start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(nn.Module):
    """Several column-parallel projections of the same input fused into one matmul (gate|up of SwiGLU).

    Checkpoints store the parts separately; part i loads through weight_loader(param, src, shard_id=i).
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        layout: ShardLayout,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = tuple(output_sizes)
        self.shards = [layout.shard_range(size) for size in self.output_sizes]
        self.local_sizes = [end - start for start, end in self.shards]
        self.weight = _param(sum(self.local_sizes), in_features, dtype=dtype)
        self.weight.weight_loader = self._load_weight  # type: ignore[attr-defined]

    def _load_weight(self, param: torch.Tensor, src: WeightSource, shard_id: int) -> None:
        offset = sum(self.local_sizes[:shard_id])
        dst = param.narrow(0, offset, self.local_sizes[shard_id])
        load_slice(dst, src, (self.output_sizes[shard_id], self.in_features), 0, self.shards[shard_id][0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """Input features split over ranks (columns in_range of the weight); the partial products are summed
    over ranks when reduce_results is set (callers that fuse several partial sums into one reduction
    pass False and reduce themselves). The bias is added once, after the sum."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        layout: ShardLayout,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        in_range: tuple[int, int] | None = None,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.in_features, self.out_features = in_features, out_features
        self.reduce_results = reduce_results
        self.in_start, in_end = in_range if in_range is not None else layout.shard_range(in_features)
        self.weight = _param(out_features, in_end - self.in_start, dtype=dtype)
        self.weight.weight_loader = self._load_weight  # type: ignore[attr-defined]
        self.bias = _param(out_features, dtype=dtype) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = load_full  # type: ignore[attr-defined]

    def _load_weight(self, param: torch.Tensor, src: WeightSource) -> None:
        load_slice(param, src, (self.out_features, self.in_features), 1, self.in_start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.reduce_results:
            y = tp_all_reduce(y, self.layout)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks; tokens outside this rank's range contribute zeros to the sum."""

    def __init__(
        self, vocab_size: int, hidden_size: int, layout: ShardLayout, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.layout = layout
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.vocab_start, self.vocab_end = layout.shard_range(vocab_size)
        self.weight = _param(self.vocab_end - self.vocab_start, hidden_size, dtype=dtype)
        self.weight.weight_loader = self._load_weight  # type: ignore[attr-defined]

    def _load_weight(self, param: torch.Tensor, src: WeightSource) -> None:
        load_slice(param, src, (self.vocab_size, self.hidden_size), 0, self.vocab_start)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.layout.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        return tp_all_reduce(self.local_embedding(input_ids), self.layout)

    def local_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """This rank's share: its rows for its tokens, zeros for the others."""
        local = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * local, self.weight)
        return out * local[:, None].to(out.dtype)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary, vocab-sharded like the embedding; logits are gathered."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return tp_all_gather(F.linear(hidden, self.weight), self.layout)
