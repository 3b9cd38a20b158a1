"""The draft model on a decode rank: a small same-family model, replicated (unsharded), with its own KV pool.

The draft pool has as many pages of the same size as the target's, and a request's pages index both: one
page table, one allocator, so rolling back a rejected block frees target and draft KV together.

EasySpec's layer-parallel drafting (DESIGN §5, arXiv 2502.02493): the first and last draft layers run as
usual; the others form consecutive groups of N. In a group, N attention sublayers take the group's input
hidden state at once, one per rank, and write their ("fuzzy") KV into that rank's pool only; one all-reduce
gathers their outputs; then every rank applies the group's residual adds and MLPs in order. Bonus
calibration, an ordinary sequential EXTEND over the verified tokens, then rewrites those tokens' draft KV on
every rank exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.forward_batch import BatchEntry, ForwardBatch, ForwardMode, build_forward_batch
from tpla_serve.layers.attention import AttentionShape, create_attention_backend
from tpla_serve.layers.linear import tp_all_reduce
from tpla_serve.models.config import ModelConfig
from tpla_serve.models.loader import load_model
from tpla_serve.tpla.layout import ShardLayout


def layer_groups(num_layers: int, group_size: int) -> list[list[int]]:
    """The draft's layers in execution order: [0], then groups of up to N middle layers, then [L-1].

    A group of one layer runs as an ordinary layer; group_size 1 is sequential drafting.
    """
    if num_layers < 1 or group_size < 1:
        raise ValueError(f"need num_layers >= 1 and group_size >= 1, got {num_layers}, {group_size}")
    if num_layers <= 2:
        return [[i] for i in range(num_layers)]
    middle = list(range(1, num_layers - 1))
    return [[0]] + [middle[i : i + group_size] for i in range(0, len(middle), group_size)] + [[num_layers - 1]]


class DraftModel:
    """One rank's copy of the draft model, its KV pool and its attention backend."""

    def __init__(
        self,
        model_path: str,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        attention_backend: str,
        tp_layout: ShardLayout,
        group_size: int,
        seed: int,
        load_format: str = "auto",
    ) -> None:
        self.model = load_model(
            model_path, dtype=dtype, device=device, load_format=load_format, seed=seed, show_progress=False
        )
        self.config = self.model.config
        self.device = device
        self.tp_layout = tp_layout  # the target's: the group all-reduce runs over the decode server's ranks
        shape = AttentionShape(
            self.config.num_attention_heads,
            self.config.kv_lora_rank,
            self.config.qk_rope_head_dim,
            page_size,
            dtype,
            self.model.model.layers[0].self_attn.scale,
        )
        # FlashInfer serves only some latent widths: a draft it cannot serve takes the automatic choice instead.
        name = "auto" if attention_backend == "flashinfer" else attention_backend
        self.attn_backend = create_attention_backend(name, device, shape)
        self.groups = layer_groups(self.config.num_hidden_layers, group_size)
        self.kv_pool = LatentKVPool(
            self.config.num_hidden_layers,
            num_pages,
            page_size,
            self.config.kv_lora_rank,
            self.config.qk_rope_head_dim,
            dtype,
            device,
        )

    @staticmethod
    def bytes_per_token(model_config: ModelConfig, dtype: torch.dtype) -> int:
        """KV bytes one token costs in the draft pool (to size the shared page count)."""
        return LatentKVPool.bytes_per_token(
            model_config.num_hidden_layers, model_config.kv_lora_rank, model_config.qk_rope_head_dim, dtype
        )

    @torch.inference_mode()
    def forward(
        self, mode: ForwardMode, entries: list[BatchEntry], layer_parallel: bool, want_logits: bool
    ) -> torch.Tensor | None:
        """Run the draft over `entries`; fp32 logits of the rows the entries ask for (when want_logits).

        layer_parallel: EasySpec drafting (every rank of the TP group must call this together);
        otherwise the ordinary sequential forward, which needs no other rank.
        """
        fb = build_forward_batch(mode, entries, self.kv_pool, self.attn_backend, self.device)
        self.attn_backend.prepare(fb)
        inner = self.model.model
        x = inner.embed_tokens(fb.input_ids)
        cos, sin = inner.rotary_emb.cos_sin(fb.positions)
        for group in self.groups if layer_parallel else [[i] for i in range(len(inner.layers))]:
            if len(group) == 1:
                x = inner.layers[group[0]](x, cos, sin, fb)
            else:
                x = self._parallel_group([inner.layers[i] for i in group], x, cos, sin, fb)
        if not want_logits:
            return None
        hidden = inner.norm(x[fb.logits_indices])
        return self.model.compute_logits(hidden)

    def _parallel_group(
        self, layers: list[nn.Module], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch
    ) -> torch.Tensor:
        """Rank r computes the attention of the group's r-th layer on the group's input; all ranks then
        apply x += A_i; x += MLP_i(x) in layer order."""
        rank = self.tp_layout.tp_rank
        attn = x.new_zeros(len(layers), *x.shape)
        if rank < len(layers):
            layer = layers[rank]
            attn[rank] = layer.self_attn(layer.input_layernorm(x), cos, sin, fb)
        attn = tp_all_reduce(attn, self.tp_layout)
        for i, layer in enumerate(layers):
            x = x + attn[i]
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x
