"""Owns the model, the latent KV pool, its page allocator and the attention backend; runs one step.

With tp_size > 1, rank 0's runner also starts the other ranks and announces every step to them; their
runners replay the steps in serve_forever().
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from tpla_serve.cache.pool import LatentKVPool, PageAllocator
from tpla_serve.config import EngineConfig
from tpla_serve.engine.forward_batch import BatchEntry, ForwardMode, build_forward_batch
from tpla_serve.engine.tp import ControlChannel, TPRanks, init_tp, rank_device
from tpla_serve.layers.attention import create_attention_backend
from tpla_serve.models.loader import load_model
from tpla_serve.tpla.layout import ShardLayout
from tpla_serve.tpla.options import TPLAOptions

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, control: ControlChannel | None = None) -> None:
        self.config = config
        self.rank = rank
        self.layout = ShardLayout(config.tp_size, rank, config.tpla_groups)
        self.device = rank_device(config, rank)
        self.peers: TPRanks | None = None
        self.control = control
        self.dtype = config.torch_dtype
        try:
            if rank == 0 and config.tp_size > 1:
                self.peers = TPRanks(config)
                try:
                    self.control = init_tp(config, 0, self.peers.port)
                except Exception as e:
                    raise RuntimeError(self.peers.failure() or f"joining the TP group failed: {e}") from e
            self._build()
        except BaseException:
            self.shutdown(kill=True)  # no rank may stay behind waiting for a collective
            raise

    def _build(self) -> None:
        config = self.config
        torch.manual_seed(config.random_seed)
        self.model = load_model(
            config.model_path,
            dtype=self.dtype,
            device=self.device,
            load_format=config.load_format,
            layout=self.layout,
            seed=config.random_seed,
            tpla=TPLAOptions(norm=config.tpla_norm, pd_sep=config.tpla_pd_sep),
            transform=config.tpla_transform,
            calibration_path=config.tpla_calibration,
        )
        self.model_config = self.model.config
        self.attn_backend = create_attention_backend(config.attention_backend, self.device)
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
        if self.config.tp_size > 1:  # every rank must address the same pages
            n = torch.tensor([num_pages], dtype=torch.int64, device=self.device)
            self._collective(lambda: dist.all_reduce(n, op=dist.ReduceOp.MIN))
            num_pages = int(n.item())
        num_pages += 1  # page 0 is reserved
        if num_pages < 2:
            raise RuntimeError(
                f"no memory left for the KV cache ({budget / 2**20:.0f} MiB budget, "
                f"{bytes_per_page} bytes per page): raise --mem-fraction-static or --kv-cache-bytes"
            )
        return num_pages

    def _collective(self, fn: Callable[[], T]) -> T:
        """Run a step that talks to the other ranks; a dead rank becomes a clear error, not a hang."""
        try:
            return fn()
        except Exception as e:
            why = self.peers.failure() if self.peers is not None else None
            raise RuntimeError(why or f"TP rank {self.rank}: a collective failed: {e}") from e

    def forward(self, mode: ForwardMode, entries: list[BatchEntry]) -> torch.Tensor:
        """Run one step (on every rank); returns fp32 logits for the rows each entry asked for."""
        if self.control is None:
            return self._forward_local(mode, entries)
        step = {
            "op": "step",
            "mode": mode.value,
            "entries": [[e.new_token_ids, e.prefix_len, e.pages, e.logits_for_all] for e in entries],
        }
        control = self.control

        def announce_and_run() -> torch.Tensor:
            control.send(step)
            return self._forward_local(mode, entries)

        return self._collective(announce_and_run)

    @torch.inference_mode()
    def _forward_local(self, mode: ForwardMode, entries: list[BatchEntry]) -> torch.Tensor:
        fb = build_forward_batch(mode, entries, self.kv_pool, self.attn_backend, self.device)
        self.attn_backend.prepare(fb)
        return self.model(fb)

    def serve_forever(self) -> None:
        """Ranks > 0: replay rank 0's steps until it says stop."""
        assert self.control is not None and self.rank > 0
        while True:
            msg = self.control.receive()
            if msg["op"] == "shutdown":
                return
            entries = [BatchEntry(ids, prefix, pages, bool(all_rows)) for ids, prefix, pages, all_rows in msg["entries"]]
            self._forward_local(ForwardMode(msg["mode"]), entries)

    def shutdown(self, kill: bool = False) -> None:
        """Stop the other ranks and leave the TP group (kill: without telling them, after a failed start)."""
        if self.peers is not None:
            if kill:
                self.peers.kill()
            elif self.peers.failure() is None:
                try:
                    self.control.send({"op": "shutdown"})
                except Exception:  # a rank already gone: nothing left to tell
                    logger.warning("TP shutdown: could not reach every rank")
            self.peers.join()
            self.peers = None
        if dist.is_initialized():
            dist.destroy_process_group()
