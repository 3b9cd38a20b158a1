"""GPU backend on FlashInfer's paged MLA kernel (`BatchMLAPagedAttentionWrapper`); SDPA for the prefill.

Under TPLA a rank's latent slice is r/g wide, so the kernel runs with head_dim_ckv = r/g and the group's
logit scale μ folded into the absorbed queries: scale · (μ q·ĉ + q_pe·k_pe) = scale · ((μ q)·ĉ + q_pe·k_pe).
The kernel is planned once per decode step (on host-side lengths, no device sync) and reused by every
layer. Requests may have different query lengths (speculative verification): the plan's qo_indptr
carries them, and FlashInfer's causal mask is aligned to the end of each request's KV, as ours is.
"""

from __future__ import annotations

import importlib.util

import torch

from tpla_serve.engine.forward_batch import ForwardBatch, ForwardMode
from tpla_serve.layers.attention import AttentionShape
from tpla_serve.layers.attention.base import AttentionBackend
from tpla_serve.layers.attention.triton_backend import sdpa_extend

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


class FlashInferAttentionBackend(AttentionBackend):
    def __init__(self, shape: AttentionShape, device: torch.device) -> None:
        problem = flashinfer_problem(shape)
        if problem is not None:
            raise ValueError(f"the flashinfer attention backend cannot run here: {problem}")
        from flashinfer.mla import BatchMLAPagedAttentionWrapper

        self.shape = shape
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrapper = BatchMLAPagedAttentionWrapper(workspace, backend="auto")
        self._planned: tuple[ForwardBatch, float] | None = None  # (step, sm_scale) of the current plan

    def prepare(self, fb: ForwardBatch) -> None:
        self._planned = None  # planned at the step's first decode call, which knows sm_scale

    def _plan(self, fb: ForwardBatch, sm_scale: float) -> None:
        """Page lists, query and KV lengths per request; host-side arrays, so planning never syncs."""
        page_size = self.shape.page_size
        num_pages = [-(-n // page_size) for n in fb.seq_lens]
        max_pages = fb.page_table.shape[1]
        flat = torch.arange(max_pages)[None, :] < torch.tensor(num_pages)[:, None]
        rows = torch.nonzero(flat.view(-1)).view(-1)  # positions in the flattened page table (host)
        kv_indices = fb.page_table.view(-1)[rows.to(fb.page_table.device, non_blocking=True)]
        self._wrapper.plan(
            _indptr(fb.q_lens),
            _indptr(num_pages),
            kv_indices,
            _int32(fb.seq_lens),
            self.shape.num_heads,
            self.shape.ckv_dim,
            self.shape.rope_dim,
            page_size,
            any(n > 1 for n in fb.q_lens),
            sm_scale,
            self.shape.dtype,
            self.shape.dtype,
        )
        self._planned = (fb, sm_scale)

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
        n, heads, ckv = q_nope.shape
        if (heads, ckv, q_pe.shape[-1]) != (self.shape.num_heads, self.shape.ckv_dim, self.shape.rope_dim):
            raise ValueError(
                f"queries [{n}, {heads}, {ckv}] + rope {q_pe.shape[-1]} do not match the planned shape "
                f"{self.shape.num_heads} heads x {self.shape.ckv_dim} + {self.shape.rope_dim}"
            )
        if q_nope.dtype != self.shape.dtype:
            raise ValueError(f"q_nope dtype {q_nope.dtype} differs from the backend's {self.shape.dtype}")
        planned = self._planned
        if planned is None or planned[0] is not fb or planned[1] != scale:
            self._plan(fb, scale)
        q = q_nope * nope_scale if nope_scale != 1.0 else q_nope
        return self._wrapper.run(
            q.contiguous(), q_pe.contiguous(), fb.kv_pool.ckv[layer], fb.kv_pool.kpe[layer]
        )
