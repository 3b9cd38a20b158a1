"""Owns the model, the latent KV pool, its page allocator and the attention backend; runs one step."""

from __future__ import annotations

import logging

import torch

from tpla_serve.cache.pool import LatentKVPool, PageAllocator
from tpla_serve.config import EngineConfig
from tpla_serve.engine.forward_batch import BatchEntry, ForwardMode, build_forward_batch
from tpla_serve.layers.attention import create_attention_backend
from tpla_serve.models.loader import load_model
from tpla_serve.tpla.layout import ShardLayout

logger = logging.getLogger(__name__)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "torch"
    return name


class ModelRunner:
    def __init__(self, config: EngineConfig, layout: ShardLayout | None = None) -> None:
        self.config = config
        self.layout = layout or ShardLayout(config.tp_size, 0, config.tpla_groups)
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        torch.manual_seed(config.random_seed)
        self.model = load_model(
            config.model_path,
            dtype=self.dtype,
            device=self.device,
            load_format=config.load_format,
            layout=self.layout,
            seed=config.random_seed,
        )
        self.model_config = self.model.config
        self.attn_backend = create_attention_backend(
            resolve_attention_backend(config.attention_backend, self.device)
        )
        self.page_size = config.resolved_page_size
        self.ckv_dim = self.model_config.kv_lora_rank // self.layout.latent_groups
        self.rope_dim = self.model_config.qk_rope_head_dim
        num_pages = self._profile_num_pages()
        self.kv_pool = LatentKVPool(
            self.model_config.num_hidden_layers,
            num_pages,
            self.page_size,
            self.ckv_dim,
            self.rope_dim,
            self.dtype,
            self.device,
        )
        self.allocator = PageAllocator(num_pages)
        logger.info(
            "KV cache: %d pages x %d tokens (%d tokens), %d bytes per token per rank (%d latent + %d rope dims)",
            num_pages - 1,
            self.page_size,
            self.max_total_tokens,
            self.kv_bytes_per_token,
            self.ckv_dim,
            self.rope_dim,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        return LatentKVPool.bytes_per_token(
            self.model_config.num_hidden_layers, self.ckv_dim, self.rope_dim, self.dtype
        )

    @property
    def max_total_tokens(self) -> int:
        return self.allocator.num_usable * self.page_size

    @property
    def context_length(self) -> int:
        return self.config.context_length or self.model_config.max_position_embeddings

    def _profile_num_pages(self) -> int:
        """Size the pool from the memory budget: measured free GPU memory, or a byte budget on CPU."""
        bytes_per_page = self.kv_bytes_per_token * self.page_size
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1.0 - self.config.mem_fraction_static)
        else:
            budget = self.config.kv_cache_bytes
        num_pages = int(budget // bytes_per_page)
        if self.config.max_total_tokens is not None:
            num_pages = min(num_pages, -(-self.config.max_total_tokens // self.page_size))
        num_pages += 1  # page 0 is reserved
        if num_pages < 2:
            raise RuntimeError(
                f"no memory left for the KV cache ({budget / 2**20:.0f} MiB budget, "
                f"{bytes_per_page} bytes per page): raise --mem-fraction-static or --kv-cache-bytes"
            )
        return num_pages

    @torch.inference_mode()
    def forward(self, mode: ForwardMode, entries: list[BatchEntry]) -> torch.Tensor:
        """Run one step; returns fp32 logits for the rows each entry asked for."""
        fb = build_forward_batch(mode, entries, self.kv_pool, self.attn_backend, self.device)
        self.attn_backend.prepare(fb)
        return self.model(fb)
