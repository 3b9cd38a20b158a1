"""GPU backend on FlashInfer's paged MLA kernel (`BatchMLAPagedAttentionWrapper`); SDPA for the prefill.

Under TPLA a rank's latent slice is r/g wide, so the kernel runs with head_dim_ckv = r/g and the group's
logit scale μ folded into the absorbed queries: scale · (μ q·ĉ + q_pe·k_pe) = scale · ((μ q)·ĉ + q_pe·k_pe).
The kernel is planned once per decode step, in prepare() (on host-side lengths, no device sync), and
reused by every layer. Requests may have different query lengths (speculative verification): the plan's
qo_indptr carries them, and FlashInfer's causal mask is aligned to the end of each request's KV, as ours is.

CUDA graphs: FlashInfer plans on the host and its run() reads the plan from the wrapper's buffers, so each
captured graph gets a wrapper of its own, built with use_cuda_graph=True over index buffers at fixed
addresses, and prepare_graph() plans it again before every replay with the step's lengths. With one new
token per request the plan's launch shape (grid, workspace offsets) depends on the head count alone, so a
graph captured over one plan replays over any other. All wrappers share one float workspace: steps run one
at a time, on one stream.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Hashable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from tpla_serve.forward_batch import ForwardBatch, ForwardMode
from tpla_serve.layers.attention import AttentionShape
from tpla_serve.layers.attention.base import AttentionBackend
from tpla_serve.layers.attention.sdpa_extend import sdpa_extend

if TYPE_CHECKING:
    from flashinfer.mla import BatchMLAPagedAttentionWrapper

# FlashInfer instantiates its MLA kernels per (head_dim_ckv, head_dim_kpe) from one template and tests
# 512/64 (DeepSeek). The TPLA slices 256 and 128 compile for sm_90a, but the Hopper (fa3) kernel then
# faults with an illegal memory access (H200, flashinfer 0.6.0), so only the full latent is accepted.
# Its split-KV scheduler sizes the partial outputs for 2-byte output types, so fp32 is not supported.
SUPPORTED_CKV = (512,)
SUPPORTED_ROPE = (64,)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended split-KV workspace


def flashinfer_problem(shape: AttentionShape) -> str | None:
    """Why FlashInfer's MLA decode cannot serve `shape` here, or None when it can."""
    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer is not installed (pip install flashinfer-python)"
    try:
        import flashinfer.mla  # noqa: F401
    except Exception as e:  # an installed but broken package is reported with its own error
        return f"flashinfer does not import: {type(e).__name__}: {e}"
    if shape.ckv_dim not in SUPPORTED_CKV:
        return f"head_dim_ckv (latent dims per rank) {shape.ckv_dim} is not one of {SUPPORTED_CKV}"
    if shape.rope_dim not in SUPPORTED_ROPE:
        return f"head_dim_kpe (qk_rope_head_dim) {shape.rope_dim} is not one of {SUPPORTED_ROPE}"
    if shape.dtype not in SUPPORTED_DTYPES:
        return f"dtype {shape.dtype} is not supported (bfloat16 or float16)"
    if shape.num_heads < 1:
        return f"num_heads must be >= 1, got {shape.num_heads}"
    if shape.page_size < 1:
        return f"page_size must be >= 1, got {shape.page_size}"
    return None


def _int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _indptr(lengths: list[int]) -> torch.Tensor:
    return torch.cumsum(_int32([0, *lengths]), 0, dtype=torch.int32)


def page_indices(page_table: torch.Tensor, num_pages: list[int]) -> torch.Tensor:
    """FlashInfer's kv_indices: the first num_pages[i] pages of each row i of `page_table`, concatenated.

    The positions are laid out on the host and the pages gathered on the device, so nothing waits for the
    GPU; `page_table` may be a strided view (a captured graph's corner of its static page table).
    """
    counts = np.asarray(num_pages, dtype=np.int64)
    batch, width = page_table.shape
    if counts.size != batch or counts.min(initial=1) < 1 or counts.max(initial=0) > width:
        raise ValueError(f"page counts {num_pages} do not fit a page table of shape {list(page_table.shape)}")
    rows = np.repeat(np.arange(counts.size), counts)
    cols = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    where = torch.from_numpy(np.stack((rows, cols))).to(page_table.device, non_blocking=True)
    return page_table[where[0], where[1]]


class _GraphWrapper(NamedTuple):
    """A captured graph's wrapper and the batch its buffers were sized for."""

    wrapper: BatchMLAPagedAttentionWrapper
    batch_size: int
    max_pages: int


class FlashInferAttentionBackend(AttentionBackend):
    capturable = True
    graphs_per_table_width = False  # its plan splits the KV by the real lengths: one width serves all

    def __init__(self, shape: AttentionShape, device: torch.device) -> None:
        problem = flashinfer_problem(shape)
        if problem is not None:
            raise ValueError(f"the flashinfer attention backend cannot run here: {problem}")
        from flashinfer.mla import BatchMLAPagedAttentionWrapper

        self.shape = shape
        self.device = device
        self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._eager = BatchMLAPagedAttentionWrapper(self._workspace, backend="auto")
        self._graphs: dict[Hashable, _GraphWrapper] = {}
        self._wrapper = self._eager  # the wrapper planned for self._step
        self._step: ForwardBatch | None = None

    def prepare(self, fb: ForwardBatch) -> None:
        if fb.mode is ForwardMode.DECODE:
            self._plan(self._eager, fb)

    def prepare_graph(self, key: Hashable, fb: ForwardBatch) -> None:
        if fb.mode is not ForwardMode.DECODE or any(n != 1 for n in fb.q_lens):
            raise ValueError(
                "a FlashInfer decode graph holds one new token per request: other query lengths change the "
                "plan's launch shape"
            )
        batch_size, max_pages = fb.batch_size, fb.page_table.shape[1]
        graph = self._graphs.get(key)
        if graph is None:
            wrapper = self._graph_wrapper(batch_size, max_pages)
            graph = self._graphs[key] = _GraphWrapper(wrapper, batch_size, max_pages)
        elif (graph.batch_size, graph.max_pages) != (batch_size, max_pages):
            raise ValueError(
                f"graph {key!r} was planned for {graph.batch_size} requests x {graph.max_pages} pages, "
                f"got {batch_size} x {max_pages}"
            )
        self._plan(graph.wrapper, fb)

    def _graph_wrapper(self, batch_size: int, max_pages: int) -> BatchMLAPagedAttentionWrapper:
        """A wrapper whose plan lives in buffers of its own, sized for the graph's batch; plan() copies
        the indptrs, lengths and page indices into them, run() reads them from there."""
        from flashinfer.mla import BatchMLAPagedAttentionWrapper

        def buffer(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int32, device=self.device)

        return BatchMLAPagedAttentionWrapper(
            self._workspace,
            use_cuda_graph=True,
            qo_indptr=buffer(batch_size + 1),
            kv_indptr=buffer(batch_size + 1),
            kv_indices=buffer(batch_size * max_pages),
            kv_len_arr=buffer(batch_size),
            backend="auto",
        )

    def _plan(self, wrapper: BatchMLAPagedAttentionWrapper, fb: ForwardBatch) -> None:
        """Page lists, query and KV lengths per request; host-side arrays, so planning never syncs."""
        page_size = self.shape.page_size
        num_pages = [-(-n // page_size) for n in fb.seq_lens]
        wrapper.plan(
            _indptr(fb.q_lens),
            _indptr(num_pages),
            page_indices(fb.page_table, num_pages),
            _int32(fb.seq_lens),
            self.shape.num_heads,
            self.shape.ckv_dim,
            self.shape.rope_dim,
            page_size,
            any(n > 1 for n in fb.q_lens),
            self.shape.sm_scale,
            self.shape.dtype,
            self.shape.dtype,
        )
        self._wrapper, self._step = wrapper, fb

    def extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch, scale: float
    ) -> torch.Tensor:
        return sdpa_extend(q, k, v, fb, scale)

    def decode(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        layer: int,
        fb: ForwardBatch,
        scale: float,
        nope_scale: float = 1.0,
    ) -> torch.Tensor:
        if fb.mode is not ForwardMode.DECODE:
            raise ValueError("the flashinfer backend's decode() runs DECODE steps (EXTEND uses extend())")
        if fb is not self._step:
            raise ValueError("decode() of a step that was not planned: run prepare(fb) before the model")
        n, heads, ckv = q_nope.shape
        if (heads, ckv, q_pe.shape[-1]) != (self.shape.num_heads, self.shape.ckv_dim, self.shape.rope_dim):
            raise ValueError(
                f"queries [{n}, {heads}, {ckv}] + rope {q_pe.shape[-1]} do not match the planned shape "
                f"{self.shape.num_heads} heads x {self.shape.ckv_dim} + {self.shape.rope_dim}"
            )
        if q_nope.dtype != self.shape.dtype:
            raise ValueError(f"q_nope dtype {q_nope.dtype} differs from the backend's {self.shape.dtype}")
        if scale != self.shape.sm_scale:
            raise ValueError(f"scale {scale} differs from the planned sm_scale {self.shape.sm_scale}")
        q = q_nope * nope_scale if nope_scale != 1.0 else q_nope
        return self._wrapper.run(
            q.contiguous(), q_pe.contiguous(), fb.kv_pool.ckv[layer], fb.kv_pool.kpe[layer]
        )
