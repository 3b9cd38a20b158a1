"""Triton paged MLA/TPLA decode attention: split-KV flash decoding with a log-sum-exp merge.

One program owns a block of query rows (heads, and query positions when q_len > 1) of one request and
one contiguous slice of its KV tokens. The heads are the M dimension of both matrix products, so each
latent page is read once per head block and feeds the QK product and the PV product from the same
on-chip tile. Small batches split the KV range across programs to fill the GPU; a second kernel merges
the per-split partial outputs by their log-sum-exp. All arithmetic accumulates in fp32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from tpla_kernels.decode_config import DecodeConfig, default_config, default_num_splits

_LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _attend_block(
    q, q_pe, ckv, kpe, tokens, kv_limit, end, m_i, l_i, acc, qk_scale, pe_rescale,
    DOT_PRECISION: tl.constexpr,
):
    """Fold one KV block into the running row max, normalizer and output (online softmax in base 2)."""
    s = tl.dot(q_pe, tl.trans(kpe), input_precision=DOT_PRECISION) * pe_rescale
    s = tl.dot(q, tl.trans(ckv), s, input_precision=DOT_PRECISION) * qk_scale
    visible = (tokens[None, :] < kv_limit[:, None]) & (tokens[None, :] < end)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(ckv.dtype), ckv, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    QNope, QPe, Ckv, Kpe, CkvDesc, KpeDesc, PageTable, SeqLens, Out, Lse,
    stride_qn_b, stride_qn_r, stride_qp_b, stride_qp_r,
    stride_c_page, stride_c_tok, stride_k_page, stride_k_tok,
    stride_pt_b,
    stride_o_b, stride_o_r, stride_o_s,
    stride_l_b, stride_l_r, stride_l_s,
    num_rows, heads, q_len, num_splits, qk_scale, pe_rescale,
    D: tl.constexpr, D_PE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Attention of one head block over one KV split.

    USE_TMA: whole blocks (BLOCK_N tokens of one page) arrive by TMA through the descriptors over the
    pools seen as [pages * PAGE_SIZE, D] rows, which keeps the gather's addresses out of registers; the
    split's partial last block is gathered with masks (slots past a sequence may hold anything).
    PARTIAL: write the normalized split output (fp32) and its base-2 LSE for the merge kernel;
    otherwise write the final output and the natural-log LSE.
    """
    head_block = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    seq_len = tl.load(SeqLens + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    rows = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < num_rows
    kv_limit = seq_len - q_len + rows // heads + 1
    offs_d = tl.arange(0, D)
    offs_pe = tl.arange(0, D_PE)
    q = tl.load(QNope + b * stride_qn_b + rows[:, None] * stride_qn_r + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    q_pe = tl.load(QPe + b * stride_qp_b + rows[:, None] * stride_qp_r + offs_pe[None, :],
                   mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
    page_row = PageTable + b * stride_pt_b
    if USE_TMA:
        gather_from = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
        for n0 in range(start, gather_from, BLOCK_N):
            pool_row = tl.load(page_row + n0 // PAGE_SIZE) * PAGE_SIZE + n0 % PAGE_SIZE
            ckv = CkvDesc.load([pool_row, 0])
            kpe = KpeDesc.load([pool_row, 0])
            m_i, l_i, acc = _attend_block(q, q_pe, ckv, kpe, n0 + tl.arange(0, BLOCK_N), kv_limit, end, m_i, l_i,
                                          acc, qk_scale, pe_rescale, DOT_PRECISION)
    else:
        gather_from = start
    # Pointer gathers: every block (no TMA) or the partial last one. Page indices of the next block are
    # read one iteration ahead, so that the latent loads never wait on a page-table read.
    first = gather_from + tl.arange(0, BLOCK_N)
    page = tl.load(page_row + first // PAGE_SIZE, mask=first < end, other=0)
    for n0 in range(gather_from, end, BLOCK_N):
        tokens = n0 + tl.arange(0, BLOCK_N)
        tok_ok = tokens < end
        nxt = tokens + BLOCK_N
        page_next = tl.load(page_row + nxt // PAGE_SIZE, mask=nxt < end, other=0)
        slot = tokens % PAGE_SIZE
        ckv = tl.load(Ckv + page.to(tl.int64)[:, None] * stride_c_page + slot[:, None] * stride_c_tok
                      + offs_d[None, :], mask=tok_ok[:, None], other=0.0)
        kpe = tl.load(Kpe + page.to(tl.int64)[:, None] * stride_k_page + slot[:, None] * stride_k_tok
                      + offs_pe[None, :], mask=tok_ok[:, None], other=0.0)
        m_i, l_i, acc = _attend_block(q, q_pe, ckv, kpe, tokens, kv_limit, end, m_i, l_i, acc, qk_scale,
                                      pe_rescale, DOT_PRECISION)
        page = page_next

    seen = l_i > 0.0
    o = acc * tl.where(seen, 1.0 / l_i, 0.0)[:, None]
    lse2 = tl.where(seen, m_i + tl.log2(l_i), float("-inf"))
    o_ptrs = Out + b * stride_o_b + rows[:, None] * stride_o_r + split * stride_o_s + offs_d[None, :]
    l_ptrs = Lse + b * stride_l_b + rows * stride_l_r + split * stride_l_s
    if PARTIAL:
        tl.store(o_ptrs, o, mask=row_ok[:, None])
        tl.store(l_ptrs, lse2, mask=row_ok)
    else:
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(l_ptrs, lse2 * LN2, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    OPart, LsePart, Out, Lse,
    stride_po_b, stride_po_r, stride_po_s,
    stride_pl_b, stride_pl_r, stride_pl_s,
    stride_o_b, stride_o_r, stride_l_b, stride_l_r,
    num_splits,
    D: tl.constexpr,
):
    """Combine one query row's split outputs, weighting each by exp(lse_split - lse)."""
    row = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    lse_row = LsePart + b * stride_pl_b + row * stride_pl_r
    m = float("-inf")
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(lse_row + s * stride_pl_s))
    m = tl.where(m == float("-inf"), 0.0, m)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    total = 0.0
    part_row = OPart + b * stride_po_b + row * stride_po_r
    for s in range(num_splits):
        w = tl.exp2(tl.load(lse_row + s * stride_pl_s) - m)
        acc += w * tl.load(part_row + s * stride_po_s + offs_d)
        total += w
    seen = total > 0.0
    out = acc * tl.where(seen, 1.0 / total, 0.0)
    tl.store(Out + b * stride_o_b + row * stride_o_r + offs_d, out.to(Out.dtype.element_ty))
    lse = tl.where(seen, (m + tl.log2(total)) * LN2, float("-inf"))
    tl.store(Lse + b * stride_l_b + row * stride_l_r, lse)


class _Shape(NamedTuple):
    batch: int
    rows: int
    ckv: int
    d_pe: int
    page_size: int


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_inputs(
    q_nope: Tensor, q_pe: Tensor, ckv_cache: Tensor, kpe_cache: Tensor, page_table: Tensor,
    seq_lens: Tensor, sm_scale: float, q_len: int, nope_scale: float, num_kv_splits: int | None,
    out: Tensor | None,
) -> _Shape:
    """Validate shapes, dtypes, devices and layouts; never reads device memory (no host sync)."""
    tensors = (("q_nope", q_nope, 3), ("q_pe", q_pe, 3), ("ckv_cache", ckv_cache, 3),
               ("kpe_cache", kpe_cache, 3), ("page_table", page_table, 2), ("seq_lens", seq_lens, 1))
    for name, t, ndim in tensors:
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
        if t.device != q_nope.device:
            raise ValueError(f"{name} is on {t.device}, q_nope on {q_nope.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    batch, rows, ckv = q_nope.shape
    d_pe = q_pe.shape[2]
    num_pages, page_size, _ = ckv_cache.shape
    if q_nope.dtype not in _DTYPES:
        raise ValueError(f"q_nope dtype must be one of {_DTYPES}, got {q_nope.dtype}")
    for name, t in (("q_pe", q_pe), ("ckv_cache", ckv_cache), ("kpe_cache", kpe_cache)):
        if t.dtype != q_nope.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from q_nope dtype {q_nope.dtype}")
    if q_pe.shape[:2] != (batch, rows):
        raise ValueError(f"q_pe shape {tuple(q_pe.shape)} does not match q_nope {tuple(q_nope.shape)}")
    if ckv_cache.shape[2] != ckv:
        raise ValueError(f"ckv_cache last dim {ckv_cache.shape[2]} differs from q_nope's {ckv}")
    if kpe_cache.shape != (num_pages, page_size, d_pe):
        raise ValueError(f"kpe_cache shape {tuple(kpe_cache.shape)}, expected {(num_pages, page_size, d_pe)}")
    if not (_is_pow2(ckv) and 16 <= ckv <= 512):
        raise ValueError(f"ckv (head_dim_ckv) must be a power of two in [16, 512], got {ckv}")
    if not (_is_pow2(d_pe) and 16 <= d_pe <= 128):
        raise ValueError(f"q_pe last dim (head_dim_kpe) must be a power of two in [16, 128], got {d_pe}")
    if not _is_pow2(page_size):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if page_table.dtype != torch.int32 or page_table.shape[0] != batch:
        raise ValueError(f"page_table must be int32 [B={batch}, max_pages], got {page_table.dtype} "
                         f"{tuple(page_table.shape)}")
    if seq_lens.dtype != torch.int32 or seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must be int32 [B={batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if q_len < 1 or rows % q_len != 0:
        raise ValueError(f"q_len must be >= 1 and divide q_nope.shape[1]={rows}, got {q_len}")
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be finite and positive, got {sm_scale}")
    if not math.isfinite(nope_scale) or nope_scale == 0:
        raise ValueError(f"nope_scale must be finite and nonzero, got {nope_scale}")
    if num_kv_splits is not None and num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    if out is not None:
        if out.shape != q_nope.shape or out.dtype != q_nope.dtype or out.device != q_nope.device:
            raise ValueError(f"out must be {q_nope.dtype} {tuple(q_nope.shape)} on {q_nope.device}, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}")
        if out.stride(-1) != 1:
            raise ValueError("out must be contiguous in its last dimension")
    return _Shape(batch, rows, ckv, d_pe, page_size)


def _tma_ready(ckv_cache: Tensor, kpe_cache: Tensor, block_n: int) -> bool:
    """TMA block loads need whole blocks inside one page, pools viewable as rows and 16-byte alignment."""
    page_size = ckv_cache.shape[1]
    return (
        ckv_cache.dtype in (torch.bfloat16, torch.float16) and page_size % block_n == 0
        and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (ckv_cache, kpe_cache))
    )


def _row_descriptor(cache: Tensor, block_n: int) -> TensorDescriptor:
    """A TMA descriptor over a [pages, page_size, dim] pool seen as [pages * page_size, dim] rows."""
    rows = cache.view(-1, cache.shape[-1])
    return TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [block_n, rows.shape[1]])


def launch_mla_decode(
    q_nope: Tensor, q_pe: Tensor, ckv_cache: Tensor, kpe_cache: Tensor, page_table: Tensor,
    seq_lens: Tensor, sm_scale: float, q_len: int, nope_scale: float, num_kv_splits: int,
    config: DecodeConfig, out: Tensor,
) -> Tensor:
    """Run the kernels on validated inputs with an explicit tiling; returns the LSE [B, rows] fp32."""
    batch, rows, ckv = q_nope.shape
    d_pe = q_pe.shape[2]
    page_size = ckv_cache.shape[1]
    heads = rows // q_len
    lse = torch.empty(batch, rows, dtype=torch.float32, device=q_nope.device)
    partial = num_kv_splits > 1
    if partial:
        o_dst = torch.empty(batch, rows, num_kv_splits, ckv, dtype=torch.float32, device=q_nope.device)
        l_dst = torch.empty(batch, rows, num_kv_splits, dtype=torch.float32, device=q_nope.device)
        o_strides = o_dst.stride()[:3]
        l_strides = l_dst.stride()
    else:
        o_dst, l_dst = out, lse
        o_strides = (out.stride(0), out.stride(1), 0)
        l_strides = (lse.stride(0), lse.stride(1), 0)
    use_tma = config.tma and _tma_ready(ckv_cache, kpe_cache, config.block_n)
    ckv_desc, kpe_desc = (_row_descriptor(ckv_cache, config.block_n), _row_descriptor(kpe_cache, config.block_n)) \
        if use_tma else (ckv_cache, kpe_cache)
    grid = (triton.cdiv(rows, config.block_h), num_kv_splits, batch)
    _decode_split_kernel[grid](
        q_nope, q_pe, ckv_cache, kpe_cache, ckv_desc, kpe_desc, page_table, seq_lens, o_dst, l_dst,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        ckv_cache.stride(0), ckv_cache.stride(1), kpe_cache.stride(0), kpe_cache.stride(1),
        page_table.stride(0),
        *o_strides, *l_strides,
        rows, heads, q_len, num_kv_splits, sm_scale * nope_scale * _LOG2E, 1.0 / nope_scale,
        D=ckv, D_PE=d_pe, PAGE_SIZE=page_size,
        BLOCK_H=config.block_h, BLOCK_N=config.block_n,
        PARTIAL=partial, USE_TMA=use_tma, DOT_PRECISION="ieee" if q_nope.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if partial:
        _merge_splits_kernel[(rows, batch)](
            o_dst, l_dst, out, lse,
            o_dst.stride(0), o_dst.stride(1), o_dst.stride(2),
            l_dst.stride(0), l_dst.stride(1), l_dst.stride(2),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            num_kv_splits, D=ckv,
            num_warps=4 if ckv >= 256 else 2,
        )
    return lse


def mla_decode(
    q_nope: Tensor,
    q_pe: Tensor,
    ckv_cache: Tensor,
    kpe_cache: Tensor,
    page_table: Tensor,
    seq_lens: Tensor,
    sm_scale: float,
    q_len: int = 1,
    nope_scale: float = 1.0,
    num_kv_splits: int | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Paged absorbed-form MLA decode, or one TPLA group's decode (ckv = r/g, nope_scale = mu_i).

    q_nope [B, q_len*H, ckv] holds absorbed queries (row r: position r // H, head r % H); q_pe
    [B, q_len*H, d_r]; ckv_cache [pages, page_size, ckv] and kpe_cache [pages, page_size, d_r] are one
    layer's pools; page_table [B, max_pages] int32; seq_lens [B] int32 counts each request's KV tokens,
    its q_len query tokens included. Query position i sees tokens t < seq_len - q_len + i + 1. Logits are
    sm_scale * (nope_scale * q_nope.ckv_t + q_pe.kpe_t).

    Returns (out [B, q_len*H, ckv] in the query dtype, lse [B, q_len*H] fp32 natural log). Rows that see
    no token (seq_len 0, e.g. padding in a CUDA-graph batch) get out = 0 and lse = -inf. Launch choices
    depend only on shapes, so the call is safe to capture in a CUDA graph.
    """
    shape = _check_inputs(q_nope, q_pe, ckv_cache, kpe_cache, page_table, seq_lens, sm_scale, q_len,
                          nope_scale, num_kv_splits, out)
    config = default_config(shape.rows, shape.ckv, q_nope.dtype)
    if num_kv_splits is None:
        num_sms = (torch.cuda.get_device_properties(q_nope.device).multi_processor_count
                   if q_nope.device.type == "cuda" else 1)
        num_kv_splits = default_num_splits(
            batch=shape.batch, head_blocks=triton.cdiv(shape.rows, config.block_h),
            max_kv=page_table.shape[1] * shape.page_size, slots=num_sms * config.ctas_per_sm)
    if out is None:
        out = torch.empty_like(q_nope)
    lse = launch_mla_decode(q_nope, q_pe, ckv_cache, kpe_cache, page_table, seq_lens, sm_scale, q_len,
                            nope_scale, num_kv_splits, config, out)
    return out, lse
