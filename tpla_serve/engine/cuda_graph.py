"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (SGLang's scheme).

A decode step of B requests with one new token each is a fixed sequence of kernels once its inputs live
at fixed addresses. Each bucket's graph is captured over static buffers; a step of B requests copies its
inputs into the first B rows of the smallest bucket >= B and replays it. Padding rows are one token at
position 0 whose KV goes to slot 0 of the reserved page 0 and which attends to that slot alone, so they
touch no request's cache. A backend that plans its kernel on the host (FlashInfer) plans each graph
outside it, before capture and again before every replay, over the buffers already holding the step.
Every rank captures the same buckets in the same order (the code path does not depend on the rank), so
the all-reduces inside the graphs pair up across ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.config import EngineConfig
from tpla_serve.engine.request_table import DecodeInputs, RequestTable
from tpla_serve.forward_batch import BatchEntry, ForwardBatch, ForwardMode
from tpla_serve.layers.attention.base import AttentionBackend
from tpla_serve.models.deepseek import DeepseekForCausalLM

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, then steps of 16, up to and including max_bs."""
    if max_bs < 1:
        raise ValueError(f"max_bs must be >= 1, got {max_bs}")
    sizes = [s for s in [1, 2, 4, 8, 16, 24, 32, *range(48, max_bs + 1, 16)] if s <= max_bs]
    return sizes if sizes[-1] == max_bs else [*sizes, max_bs]


def pad_decode_inputs(
    entries: list[BatchEntry], bs: int, max_pages: int, page_size: int, q_len: int = 1
) -> DecodeInputs:
    """Lay out entries of q_len new tokens each over bs rows of q_len tokens; rows past len(entries) are
    padding: tokens at positions 0 .. q_len-1 of the reserved page 0."""
    if len(entries) > bs:
        raise ValueError(f"{len(entries)} requests do not fit a bucket of {bs}")
    pad = bs - len(entries)
    ids, pos, loc, seq = [], [], [], []
    table = np.zeros((bs, max_pages), dtype=np.int32)
    for i, e in enumerate(entries):
        if len(e.new_token_ids) != q_len:
            raise ValueError(f"a captured step of {q_len} new tokens per request got {len(e.new_token_ids)}")
        end = e.prefix_len + q_len
        if len(e.pages) > max_pages or len(e.pages) * page_size < end:
            raise ValueError(f"{len(e.pages)} pages (max {max_pages}) cannot hold {end} tokens")
        ids.extend(e.new_token_ids)
        pos.extend(range(e.prefix_len, end))
        loc.extend(e.pages[p // page_size] * page_size + p % page_size for p in range(e.prefix_len, end))
        seq.append(end)
        table[i, : len(e.pages)] = e.pages
    padding = list(range(q_len)) * pad
    return DecodeInputs(
        torch.tensor(ids + [0] * len(padding), dtype=torch.int64),
        torch.tensor(pos + padding, dtype=torch.int64),
        torch.tensor(loc + padding, dtype=torch.int64),
        torch.tensor(seq + [q_len] * pad, dtype=torch.int32),
        torch.from_numpy(table),
    )


def page_widths(max_pages: int, page_size: int) -> list[int]:
    """Page-table widths captured: 4K tokens, then x4 steps, up to max_pages. The attention kernel sizes
    its KV split by the table's width, so a step replays the narrowest graph its longest request fits
    (a 4K-token batch must not pay for splits sized for the full context)."""
    widths, width = [], max(1, 4096 // page_size)
    while width < max_pages:
        widths.append(width)
        width *= 4
    return [*widths, max_pages]


class StaticDecodeBatch:
    """The inputs every captured decode graph reads at fixed addresses: rows [0, bs) (tokens [0, bs * q_len))
    and page-table columns [0, width) of buffers sized for the largest bucket, and the attention backend's
    plan for each graph. q_len > 1 (speculative blocks: verification, calibration) is q_len new tokens per
    request, causal within the request's block."""

    def __init__(
        self,
        max_bs: int,
        max_pages: int,
        kv_pool: LatentKVPool,
        attn_backend: AttentionBackend,
        device: torch.device,
        max_q_len: int = 1,
    ) -> None:
        self.kv_pool = kv_pool
        self.attn_backend = attn_backend
        self.device = device
        max_tokens = max_bs * max_q_len
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.page_table = torch.zeros(max_bs, max_pages, dtype=torch.int32, device=device)
        self.rows = torch.arange(max_tokens + 1, dtype=torch.int64, device=device)

    def planned_batch(self, bs: int, width: int, seq_lens: list[int], q_len: int = 1) -> ForwardBatch:
        """The (bs, width[, q_len]) graph's batch over the buffers, whose KV lengths are `seq_lens`, after the
        attention backend has planned that graph for it. Logits come for every new token."""
        kv_indptr = torch.tensor([0, *seq_lens], dtype=torch.int64).cumsum(0)
        n = bs * q_len
        fb = ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:n],
            positions=self.positions[:n],
            q_lens=[q_len] * bs,
            seq_lens=seq_lens,
            qo_indptr=self.rows[: n + 1 : q_len],
            kv_indptr=kv_indptr.to(self.device, non_blocking=True),
            out_cache_loc=self.out_cache_loc[:n],
            page_table=self.page_table[:bs, :width],
            seq_lens_t=self.seq_lens[:bs],
            logits_indices=self.rows[:n],
            kv_pool=self.kv_pool,
            attn_backend=self.attn_backend,
        )
        self.attn_backend.prepare_graph((bs, width) if q_len == 1 else (bs, width, q_len), fb)
        return fb

    def load(self, entries: list[BatchEntry], bs: int, width: int, q_len: int = 1) -> ForwardBatch:
        """Copy a step into the buffers, then plan the (bs, width[, q_len]) graph for it (in that order: a
        plan may read the buffers, as FlashInfer's gathers its page indices from the page table)."""
        inputs = pad_decode_inputs(entries, bs, width, self.kv_pool.page_size, q_len)
        self._copy_rows(inputs, 0, bs, width, q_len)
        return self.planned_batch(bs, width, inputs.seq_lens.tolist(), q_len)

    def load_from_table(self, table: RequestTable, slots: np.ndarray, positions: np.ndarray, bs: int,
                        width: int, input_ids: torch.Tensor | None = None) -> ForwardBatch:
        """One token per request from the request table, by device copies: rows [0, n) gathered, [n, bs)
        padding; the new tokens are the slots' newest unless input_ids [n] (on the device) are given."""
        n = len(slots)
        inputs = table.gather(slots, positions, self.kv_pool.page_size, width)
        if input_ids is not None:
            inputs = inputs._replace(input_ids=input_ids)
        self._copy_rows(inputs, 0, n, width)
        if n < bs:  # padding: one token at position 0, written to and reading only slot 0 of page 0
            for buf in (self.input_ids, self.positions, self.out_cache_loc):
                buf[n:bs].zero_()
            self.seq_lens[n:bs].fill_(1)
            self.page_table[n:bs, :width].zero_()
        return self.planned_batch(bs, width, (positions + 1).tolist() + [1] * (bs - n))

    def _copy_rows(self, inputs: DecodeInputs, start: int, end: int, width: int, q_len: int = 1) -> None:
        for dst, src in zip((self.input_ids, self.positions, self.out_cache_loc), inputs):
            dst[start * q_len : end * q_len].copy_(src, non_blocking=True)
        self.seq_lens[start:end].copy_(inputs.seq_lens, non_blocking=True)
        self.page_table[start:end, :width].copy_(inputs.page_table, non_blocking=True)


class CudaGraphRunner:
    """Captures a model's decode step per (batch size, new tokens per request, page-table width) bucket and
    replays it: one new token per request, and for speculative blocks q_len > 1 (verification over
    [x, d_1..d_k], the draft's calibration), every q_len in `q_lens`. `forward` (default: the model) maps the
    step's batch to the fp32 logits of every new token.

    `disabled_reason` says why nothing is captured (then can_run() is always False and the engine runs
    eagerly). Replayed logits are copies: they stay valid after the next replay.
    """

    def __init__(
        self,
        model: DeepseekForCausalLM,
        attn_backend: AttentionBackend,
        kv_pool: LatentKVPool,
        config: EngineConfig,
        device: torch.device,
        max_pages: int,
        q_lens: tuple[int, ...] = (1,),
        forward: Callable[[ForwardBatch], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.forward = forward or model
        self.q_lens = tuple(sorted({q for q in q_lens if q == 1 or attn_backend.graph_query_blocks}))
        self.attn_backend = attn_backend
        self.kv_pool = kv_pool
        self.device = device
        self.max_pages = max_pages
        self.page_size = kv_pool.page_size
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int, int], torch.Tensor] = {}
        self.widths = page_widths(max_pages, self.page_size) if attn_backend.graphs_per_table_width else [max_pages]
        self.num_replays = 0
        max_bs = min(config.cuda_graph_max_bs, config.max_running_requests)
        self.batch_sizes = capture_batch_sizes(max_bs)
        self.disabled_reason: str | None = None
        if device.type != "cuda":
            self.disabled_reason = f"the device is {device.type}, not cuda"
        elif not attn_backend.capturable:
            self.disabled_reason = f"the {type(attn_backend).__name__} cannot be captured in a CUDA graph"
        elif (problem := model.cuda_graph_problem()) is not None:
            self.disabled_reason = problem
        if self.disabled_reason is not None:
            return
        self.static = StaticDecodeBatch(
            self.batch_sizes[-1], max_pages, kv_pool, attn_backend, device, self.q_lens[-1]
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, all in one memory pool (smaller graphs reuse its blocks).
        Each is planned for its capture-time contents: one token at position 0 per row."""
        if self.disabled_reason is not None:
            logger.info("CUDA graphs off: %s", self.disabled_reason)
            return
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        quiet = dist.is_initialized() and dist.get_rank() != 0
        keys = [
            (bs, q, w) for q in self.q_lens[::-1] for bs in self.batch_sizes[::-1] for w in self.widths[::-1]
        ]
        for bs, q_len, width in tqdm(keys, desc="capturing decode CUDA graphs", disable=quiet):
            fb = self.static.planned_batch(bs, width, [q_len] * bs, q_len)
            for _ in range(2):  # compile kernels, initialize communicators and library workspaces
                self.forward(fb)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs, q_len, width] = self.forward(fb)
            self.graphs[bs, q_len, width] = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "CUDA graphs: captured decode batch sizes %s x new tokens per request %s x page-table widths %s "
            "in %.1f s", self.batch_sizes, self.q_lens, self.widths, time.perf_counter() - start,
        )

    def can_run(self, mode: ForwardMode, entries: list[BatchEntry]) -> bool:
        """A decode step of one captured q_len of new tokens for every request, within the largest bucket
        and the page-table width."""
        if not self.graphs or mode is not ForwardMode.DECODE or not 0 < len(entries) <= self.batch_sizes[-1]:
            return False
        q_len = len(entries[0].new_token_ids)
        return q_len in self.q_lens and all(
            len(e.new_token_ids) == q_len and e.kv_room is None and len(e.pages) <= self.max_pages
            for e in entries
        )

    def can_replay(self, batch_size: int, max_seq_len: int) -> bool:
        """A decode step of `batch_size` requests whose longest holds max_seq_len tokens after it."""
        fits = batch_size <= self.batch_sizes[-1] and max_seq_len <= self.max_pages * self.page_size
        return bool(self.graphs) and fits

    @torch.inference_mode()  # planning writes buffers that capture (in inference mode) created
    def replay(self, entries: list[BatchEntry]) -> torch.Tensor:
        """fp32 logits of the step's rows the entries ask for (the last new token of each request, or all of
        them with logits_for_all), computed by the smallest bucket >= B whose page table holds the longest
        request."""
        q_len = len(entries[0].new_token_ids)
        bs, width = self._bucket(len(entries), max(len(e.pages) for e in entries))
        self.static.load(entries, bs, width, q_len)
        logits = self._run(bs, q_len, width, len(entries) * q_len)
        if q_len == 1 or all(e.logits_for_all for e in entries):
            return logits
        rows = [i * q_len + (j if e.logits_for_all else q_len - 1)
                for i, e in enumerate(entries) for j in range(q_len if e.logits_for_all else 1)]
        return logits[rows]

    @torch.inference_mode()
    def replay_from_table(
        self,
        table: RequestTable,
        slots: np.ndarray,
        positions: np.ndarray,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The same for a one-token-per-request step described by slots and positions (its inputs gathered
        from the table on the device; input_ids [B] on the device replace the slots' newest tokens)."""
        bs, width = self._bucket(len(slots), -(-int(positions.max() + 1) // self.page_size))
        self.static.load_from_table(table, slots, positions, bs, width, input_ids)
        return self._run(bs, 1, width, len(slots))

    def _bucket(self, n: int, pages: int) -> tuple[int, int]:
        return next(s for s in self.batch_sizes if s >= n), next(w for w in self.widths if w >= pages)

    def _run(self, bs: int, q_len: int, width: int, n: int) -> torch.Tensor:
        self.graphs[bs, q_len, width].replay()
        self.num_replays += 1
        return self.logits[bs, q_len, width][:n].clone()
