"""What one model step sees: the batch flattened along tokens plus its KV-cache addressing."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from tpla_serve.cache.pool import LatentKVPool
    from tpla_serve.layers.attention.base import AttentionBackend


class LatentObserver(Protocol):
    """Receives every layer's normalized latent ĉ [N, r] and absorbed queries q̃ [N, H, r] (calibration)."""

    def observe(self, layer: int, c_hat: torch.Tensor, q_abs: torch.Tensor) -> None: ...


class LayerKVSink(Protocol):
    """Receives every layer's newly written cache rows (ĉ as cached, k_pe) of the N new tokens (PD prefill)."""

    def on_layer(self, layer: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None: ...


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prompt (or prompt chunk) tokens: exact MLA in MHA form
    DECODE = "decode"  # generated tokens: absorbed form over the latent cache; q_len >= 1 per request


class ExtendKV(NamedTuple):
    """Where an EXTEND step's keys are: the distinct KV slots its requests read, each expanded once
    (requests that share a cached prefix share its pages), and each request's keys among those rows as
    (start, end) runs in position order. Attention reads the runs as views: nothing is gathered per request."""

    slots: torch.Tensor | None  # [U] int64 on the device; None: no prefix, the rows are the new tokens
    runs: list[list[tuple[int, int]]]


@dataclass
class ForwardBatch:
    """B requests, N = sum(q_lens) new tokens. Every new token's KV is written before attention runs,
    so a request's KV (prefix + new) is exactly the slots kv_indices[kv_indptr[i]:kv_indptr[i+1]]."""

    mode: ForwardMode
    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    q_lens: list[int]  # new tokens per request (host)
    seq_lens: list[int]  # KV tokens per request after this step, prefix + new (host)
    qo_indptr: torch.Tensor  # [B+1] int64
    kv_indptr: torch.Tensor  # [B+1] int64
    out_cache_loc: torch.Tensor  # [N] int64 slots the new tokens are written to
    page_table: torch.Tensor  # [B, max_pages] int32, padded with page 0
    seq_lens_t: torch.Tensor  # [B] int32, seq_lens on the device
    logits_indices: torch.Tensor  # [M] int64 rows of the N tokens whose logits the caller wants
    kv_pool: LatentKVPool
    attn_backend: AttentionBackend
    capture: LatentObserver | None = None
    kv_sink: LayerKVSink | None = None
    extend_kv: ExtendKV | None = None  # EXTEND steps: built with the batch, from the host's page lists
    sdpa_groups: list[Any] | None = None  # EXTEND steps on a GPU: the batched SDPA plan, built by layer 0
    _kv_indices: torch.Tensor | None = None
    _padded_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    _causal_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    _future_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.q_lens)

    @property
    def kv_indices(self) -> torch.Tensor:
        """[sum(seq_lens)] int64: every KV slot of every request, in position order. Computed on the device
        from the page table on first use: paged kernels never need it, so most decode steps skip it."""
        if self._kv_indices is None:
            page_size = self.kv_pool.page_size
            t = torch.arange(max(self.seq_lens), device=self.page_table.device)
            slots = self.page_table[:, t // page_size].long() * page_size + t % page_size
            self._kv_indices = slots[t[None, :] < self.seq_lens_t[:, None].long()]
        return self._kv_indices

    @property
    def padded_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [B, L_max] int64, valid [B, L_max] bool): each request's KV slots in position order,
        padded to the longest; shared by every layer of the step."""
        if self._padded_kv is None:
            page_size = self.kv_pool.page_size
            t = torch.arange(max(self.seq_lens), device=self.page_table.device)
            slots = self.page_table[:, t // page_size].long() * page_size + t % page_size
            self._padded_kv = slots, t[None, :] < self.seq_lens_t[:, None]
        return self._padded_kv

    def causal_mask(self, i: int) -> torch.Tensor:
        """[q_len, seq_len] bool of request i, True where a query may see a key (not a later position): its
        q_len new tokens are the last of its seq_len. Built once per step, shared by every layer."""
        mask = self._causal_masks.get(i)
        if mask is None:
            q_len, kv_len = self.q_lens[i], self.seq_lens[i]
            device = self.input_ids.device
            q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
            mask = self._causal_masks[i] = torch.arange(kv_len, device=device)[None, :] <= q_pos
        return mask

    def future_mask(self, q_len: int) -> torch.Tensor:
        """[q_len, q_len] bool, True where a new token would see a later new token: the part of a causal
        mask that is not all-visible (every query sees the whole prefix). Shared by the step's requests."""
        mask = self._future_masks.get(q_len)
        if mask is None:
            ones = torch.ones(q_len, q_len, dtype=torch.bool, device=self.input_ids.device)
            mask = self._future_masks[q_len] = torch.triu(ones, diagonal=1)
        return mask


@dataclass(frozen=True)
class TableDelta:
    """Writes to a RequestTable: page ids at flat (slot * width + column) indices, and slots' tokens."""

    page_index: np.ndarray  # [K] int64
    page_id: np.ndarray  # [K] int32
    token_slot: np.ndarray  # [M] int64
    token_id: np.ndarray  # [M] int64

    @classmethod
    def empty(cls) -> TableDelta:
        return cls(*(np.zeros(0, dtype=d) for d in (np.int64, np.int32, np.int64, np.int64)))

    def __bool__(self) -> bool:
        return bool(self.page_index.size or self.token_slot.size)

    def to_bytes(self) -> list[bytes]:
        return [a.tobytes() for a in (self.page_index, self.page_id, self.token_slot, self.token_id)]

    @classmethod
    def from_bytes(cls, frames: list[bytes]) -> TableDelta:
        if len(frames) != 4:
            raise ValueError(f"a table delta has 4 arrays, got {len(frames)}")
        index, page, slot, token = (np.frombuffer(bytearray(f), dtype=d)  # writable: torch shares the memory
                                    for f, d in zip(frames, (np.int64, np.int32, np.int64, np.int64)))
        if index.size != page.size or slot.size != token.size:
            raise ValueError("a table delta's index and value arrays differ in length")
        return cls(index, page, slot, token)


@dataclass(frozen=True)
class BatchEntry:
    """One request's part of a step: its new tokens, how many tokens it already has cached, its pages."""

    new_token_ids: list[int]
    prefix_len: int
    pages: list[int]
    logits_for_all: bool = False  # True: logits of every new token (prompt logprobs, verification)
    kv_room: int | None = None  # PD prefill: stream these tokens' KV to this bootstrap room
    kv_start: int | None = None  # PD prefill: stream from this token (< prefix_len: a cached prefix first)


def extend_kv(entries: list[BatchEntry], page_size: int, device: torch.device | str) -> ExtendKV:
    """Lay out an EXTEND step's distinct KV rows in order of first use: page by page, as many rows of a
    page as the request that reads furthest into it needs. A request's keys are then a few runs of
    consecutive rows (a shared prefix's, then its own), so attention reads them without a gather.
    Vectorized over the step's pages: long cached prefixes cost no per-page Python."""
    if all(e.prefix_len == 0 for e in entries):
        starts = np.cumsum([0] + [len(e.new_token_ids) for e in entries]).tolist()
        return ExtendKV(None, [[(a, b)] for a, b in zip(starts, starts[1:])])
    seq_lens = [e.prefix_len + len(e.new_token_ids) for e in entries]
    n_pages = np.array([-(-n // page_size) for n in seq_lens], dtype=np.int64)
    pages = np.concatenate([np.asarray(e.pages[:k], dtype=np.int64)
                            for e, k in zip(entries, n_pages.tolist())])
    first_of = np.cumsum(n_pages) - n_pages  # each request's first entry in `pages`
    used = np.full(pages.shape[0], page_size, dtype=np.int64)  # tokens each entry reads of its page
    used[first_of + n_pages - 1] = np.asarray(seq_lens) - (n_pages - 1) * page_size
    distinct, first_use, which = np.unique(pages, return_index=True, return_inverse=True)
    rows = np.zeros(distinct.shape[0], dtype=np.int64)
    np.maximum.at(rows, which, used)  # rows a distinct page takes: the most any request reads of it
    order = np.argsort(first_use, kind="stable")  # distinct pages in order of first use
    base = np.empty_like(rows)
    base[order] = np.cumsum(rows[order]) - rows[order]
    start = base[which]  # each entry's first row
    # A run breaks at each request's first page and wherever a page's rows do not follow the last one's.
    breaks = np.ones(pages.shape[0], dtype=bool)
    breaks[1:] = start[1:] != start[:-1] + used[:-1]
    breaks[first_of] = True
    heads = np.flatnonzero(breaks)
    ends = np.append(heads[1:], pages.shape[0])
    run_start, run_end = start[heads], start[ends - 1] + used[ends - 1]
    owner = np.searchsorted(first_of, heads, side="right") - 1
    runs: list[list[tuple[int, int]]] = [[] for _ in entries]
    for i, a, b in zip(owner.tolist(), run_start.tolist(), run_end.tolist()):
        runs[i].append((a, b))
    counts = rows[order]
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    slots = np.repeat(distinct[order] * page_size, counts) + offsets
    return ExtendKV(torch.from_numpy(slots).to(device, non_blocking=True), runs)


def build_forward_batch(
    mode: ForwardMode,
    entries: list[BatchEntry],
    kv_pool: LatentKVPool,
    attn_backend: AttentionBackend,
    device: torch.device | str,
    capture: LatentObserver | None = None,
) -> ForwardBatch:
    """Lay out a step on the host, then move it to the device in one go per tensor.

    A request's pages must already cover prefix_len + len(new_token_ids) tokens.
    """
    page_size = kv_pool.page_size
    input_ids: list[int] = []
    positions: list[int] = []
    q_lens: list[int] = []
    seq_lens: list[int] = []
    out_loc: list[int] = []
    logits_rows: list[int] = []
    for e in entries:
        q_len = len(e.new_token_ids)
        seq_len = e.prefix_len + q_len
        if q_len == 0:
            raise ValueError("a batch entry needs at least one new token")
        if len(e.pages) * page_size < seq_len:
            raise ValueError(f"{len(e.pages)} pages of {page_size} cannot hold {seq_len} tokens")
        row0 = len(input_ids)
        input_ids.extend(e.new_token_ids)
        positions.extend(range(e.prefix_len, seq_len))
        out_loc.extend(e.pages[t // page_size] * page_size + t % page_size for t in range(e.prefix_len, seq_len))
        logits_rows.extend(range(row0, row0 + q_len) if e.logits_for_all else [row0 + q_len - 1])
        q_lens.append(q_len)
        seq_lens.append(seq_len)
    max_pages = max(len(e.pages) for e in entries)
    table = np.zeros((len(entries), max_pages), dtype=np.int32)  # row by row in numpy: no per-row tensors
    for i, e in enumerate(entries):
        table[i, : len(e.pages)] = e.pages
    page_table = torch.from_numpy(table).to(device, non_blocking=True)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32).to(device, non_blocking=True)

    def indptr(lens: list[int]) -> torch.Tensor:
        return torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(device)

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    return ForwardBatch(
        mode=mode,
        input_ids=ints(input_ids),
        positions=ints(positions),
        q_lens=q_lens,
        seq_lens=seq_lens,
        qo_indptr=indptr(q_lens),
        kv_indptr=indptr(seq_lens),
        out_cache_loc=ints(out_loc),
        page_table=page_table,
        seq_lens_t=seq_lens_t,
        logits_indices=ints(logits_rows),
        kv_pool=kv_pool,
        attn_backend=attn_backend,
        capture=capture,
        extend_kv=extend_kv(entries, page_size, device) if mode is ForwardMode.EXTEND else None,
    )
