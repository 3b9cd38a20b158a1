"""One rank's model, latent KV pool, page allocator, attention backend and CUDA graphs; runs one step.

Collaborators come in at construction: the TP group (None on one rank) and how many more KV bytes per
token the rank's pool must leave room for (a draft model's pool shares the page count). With TP, rank 0's
forward() announces the step to the other ranks, whose workers run forward_local() with it.
"""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from tpla_serve.cache.pool import LatentKVPool, PageAllocator
from tpla_serve.config import EngineConfig
from tpla_serve.distributed import RandomizeKV, RunDecode, RunStep, TPGroup, rank_device
from tpla_serve.engine.cuda_graph import CudaGraphRunner
from tpla_serve.engine.request_table import RequestTable
from tpla_serve.forward_batch import BatchEntry, ForwardMode, LayerKVSink, TableDelta, build_forward_batch
from tpla_serve.layers.attention import AttentionShape, create_attention_backend
from tpla_serve.models.loader import load_model
from tpla_serve.tpla.layout import ShardLayout
from tpla_serve.tpla.options import TPLAOptions

logger = logging.getLogger(__name__)
T = TypeVar("T")
NO_SLOTS = np.zeros(0, dtype=np.int64)


GPU_HEADROOM_FRACTION = 0.05  # of the device, kept free for activations, CUDA graphs and the allocator


def gpu_kv_budget(total: int, free: int, held: int, mem_fraction_static: float) -> int:
    """Bytes for the KV pool on a GPU: this process's share of the device (mem_fraction_static of it, for
    its weights and KV) less what it holds already, and never more than the free memory less a headroom.
    Counted per process, so servers sharing one GPU each take their own fraction (not what the others
    left free)."""
    own_share = int(total * mem_fraction_static) - held
    return min(own_share, free - int(total * GPU_HEADROOM_FRACTION))


class ModelRunner:
    def __init__(
        self, config: EngineConfig, rank: int = 0, tp: TPGroup | None = None, extra_kv_bytes_per_token: int = 0
    ) -> None:
        if config.tp_size > 1 and tp is None:
            raise ValueError(f"tp_size {config.tp_size} needs the TP group (start the engine with launch_rank0)")
        self.config = config
        self.rank = rank
        self.tp = tp
        self.layout = ShardLayout(config.tp_size, rank, config.tpla_groups)
        self.device = rank_device(config, rank)
        self.dtype = config.torch_dtype
        torch.manual_seed(config.random_seed)
        self.model = load_model(
            config.model_path,
            dtype=self.dtype,
            device=self.device,
            load_format=config.load_format,
            layout=self.layout,
            seed=config.random_seed,
            config_overrides=config.model_overrides,
            tpla=TPLAOptions(norm=config.tpla_norm, pd_sep=config.tpla_pd_sep),
            transform=config.tpla_transform,
            calibration_path=config.tpla_calibration,
        )
        self.model_config = self.model.config
        self.page_size = config.resolved_page_size
        self.ckv_dim = self.model_config.kv_lora_rank // self.layout.latent_groups
        self.rope_dim = self.model_config.qk_rope_head_dim
        attn = self.model.layers[0].self_attn
        shape = AttentionShape(
            attn.num_local_heads, self.ckv_dim, self.rope_dim, self.page_size, self.dtype, attn.scale
        )
        self.attn_backend = create_attention_backend(config.attention_backend, self.device, shape)
        self.num_pages = self._profile_num_pages(extra_kv_bytes_per_token)
        self.kv_pool = LatentKVPool(
            self.model_config.num_hidden_layers,
            self.num_pages,
            self.page_size,
            self.ckv_dim,
            self.rope_dim,
            self.dtype,
            self.device,
        )
        self.allocator = PageAllocator(self.num_pages)
        self.max_pages_per_request = -(-self.context_length // self.page_size)
        self.table = RequestTable(config.max_running_requests, self.max_pages_per_request, self.device)
        self.kv_fingerprint = self._kv_fingerprint()
        self.cuda_graph: CudaGraphRunner | None = None
        if self.device.type == "cuda" and not config.disable_cuda_graph:
            # Speculative decoding verifies blocks of k + 1 tokens per request: those steps are captured too.
            q_lens = (1, config.speculative_num_draft_tokens + 1) if config.speculative else (1,)
            self.cuda_graph = CudaGraphRunner(
                self.model, self.attn_backend, self.kv_pool, config, self.device, self.max_pages_per_request,
                q_lens,
            )
            self._collective(self.cuda_graph.capture)
        logger.info(
            "KV cache: %d pages x %d tokens (%d tokens), %d bytes per token per rank (%d latent + %d rope dims)",
            self.num_pages - 1,
            self.page_size,
            self.max_total_tokens,
            self.kv_bytes_per_token,
            self.ckv_dim,
            self.rope_dim,
        )

    def _kv_fingerprint(self) -> str:
        """What a PD peer must match: the weights, the latent transform and the calibration folded in."""
        h = hashlib.sha256(f"{self.model.fingerprint}|{self.config.tpla_transform}".encode())
        if self.config.tpla_calibration is not None:
            h.update(Path(self.config.tpla_calibration).read_bytes())
        return h.hexdigest()[:16]

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

    def _profile_num_pages(self, extra_kv_bytes_per_token: int) -> int:
        """Size the pool from the memory budget: measured free GPU memory, or a byte budget on CPU."""
        bytes_per_page = (self.kv_bytes_per_token + extra_kv_bytes_per_token) * self.page_size
        if self.device.type == "cuda":
            gc.collect()  # an engine shut down earlier in this process may still hold blocks through cycles
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            held = torch.cuda.memory_reserved(self.device)
            budget = gpu_kv_budget(total, free, held, self.config.mem_fraction_static)
        else:
            budget = self.config.kv_cache_bytes
        num_pages = int(budget // bytes_per_page)
        if self.config.max_total_tokens is not None:
            num_pages = min(num_pages, -(-self.config.max_total_tokens // self.page_size))
        if self.tp is not None:  # every rank must address the same pages
            num_pages = self.tp.min_over_ranks(num_pages, self.device)
        num_pages += 1  # page 0 is reserved
        if num_pages < 2:
            raise RuntimeError(
                f"no memory left for the KV cache ({budget / 2**20:.0f} MiB budget, "
                f"{bytes_per_page} bytes per page): raise --mem-fraction-static or --kv-cache-bytes"
            )
        return num_pages

    def _collective(self, fn: Callable[[], T]) -> T:
        """Run something the other ranks take part in; a dead rank becomes a clear error (TPGroup)."""
        return fn() if self.tp is None else self.tp.collective(fn)

    def forward(
        self,
        mode: ForwardMode,
        entries: list[BatchEntry],
        kv_sink: LayerKVSink | None = None,
        sample_slots: np.ndarray = NO_SLOTS,
    ) -> torch.Tensor:
        """Run one step (on every rank); fp32 logits for the rows each entry asked for.

        kv_sink (rank 0 of a PD prefill): receives every layer's new KV rows as they are written.
        sample_slots: the requests whose next token this step samples; commit_tokens() must follow.
        """
        delta = self.table.take_delta()
        if self.tp is not None:
            self.tp.announce(RunStep(mode, entries, delta, sample_slots))
        return self._collective(lambda: self.forward_local(mode, entries, kv_sink, delta))

    @torch.inference_mode()
    def forward_local(
        self,
        mode: ForwardMode,
        entries: list[BatchEntry],
        kv_sink: LayerKVSink | None = None,
        delta: TableDelta | None = None,
    ) -> torch.Tensor:
        """This rank's part of a step (ranks > 0 run it when rank 0 announces the step)."""
        if delta:
            self.table.apply(delta)
        if kv_sink is None and self.cuda_graph is not None and self.cuda_graph.can_run(mode, entries):
            return self.cuda_graph.replay(entries)
        fb = build_forward_batch(mode, entries, self.kv_pool, self.attn_backend, self.device)
        fb.kv_sink = kv_sink
        self.attn_backend.prepare(fb)
        return self.model(fb)

    def decode(self, slots: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """One decode step of the requests in `slots`, each one new token at `positions` (int64 arrays),
        its inputs gathered from the request table on every rank; fp32 logits [B, V]. commit_tokens()
        must follow with the sampled tokens."""
        delta = self.table.take_delta()
        if self.tp is not None:
            self.tp.announce(RunDecode(slots, positions, delta))
        return self._collective(lambda: self.decode_local(slots, positions, delta))

    @torch.inference_mode()
    def decode_local(self, slots: np.ndarray, positions: np.ndarray, delta: TableDelta) -> torch.Tensor:
        if delta:
            self.table.apply(delta)
        seq_lens = positions + 1
        if self.cuda_graph is not None and self.cuda_graph.can_replay(len(slots), int(seq_lens.max())):
            return self.cuda_graph.replay_from_table(self.table, slots, positions)
        fb = self.table.decode_batch(slots, positions, self.kv_pool, self.attn_backend)
        self.attn_backend.prepare(fb)
        return self.model(fb)

    def commit_tokens(self, slots: np.ndarray, tokens: torch.Tensor) -> None:
        """Rank 0: the step's sampled tokens become the slots' newest tokens on every rank (a broadcast on
        the device: no host round trip)."""
        slots_t = torch.from_numpy(slots).to(self.device, non_blocking=True)
        tokens = tokens.to(torch.int64)
        if self.tp is not None:
            self._collective(lambda: dist.broadcast(tokens, src=0))
        self.table.set_tokens(slots_t, tokens)

    def receive_tokens(self, slots: np.ndarray) -> None:
        """Ranks > 0: commit_tokens()'s other end."""
        tokens = torch.empty(len(slots), dtype=torch.int64, device=self.device)
        dist.broadcast(tokens, src=0)
        self.table.set_tokens(torch.from_numpy(slots).to(self.device, non_blocking=True), tokens)

    @torch.no_grad()
    def randomize_kv(self, seed: int) -> None:
        """Fill every rank's KV pool with random values: decode speed runs skip prefill, and a decode step's
        cost does not depend on what the cache holds (zeros, though, could flatter a kernel)."""
        if self.tp is not None:
            self.tp.announce(RandomizeKV(seed))
        self.randomize_kv_local(seed)

    @torch.no_grad()
    def randomize_kv_local(self, seed: int) -> None:
        gen = torch.Generator(device=self.device).manual_seed(seed + self.rank)
        for t in self.kv_pool.ckv + self.kv_pool.kpe:
            t.normal_(generator=gen)

    def release_graphs(self) -> None:
        """Drop the captured graphs: they hold work of the group's communicator, which must go after them."""
        self.cuda_graph = None

    def release_memory(self) -> None:
        """Give the device memory back: another engine may start in this process."""
        self.cuda_graph = None
        if self.device.type == "cuda":
            del self.model, self.kv_pool, self.attn_backend
            torch.cuda.empty_cache()
