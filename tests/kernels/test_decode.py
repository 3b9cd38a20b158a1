"""Triton paged MLA/TPLA decode kernel against the torch reference, through Triton's CPU interpreter."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from kernel_case import make_paged_case, rel_err

from tpla_kernels.decode_config import DecodeConfig, default_num_splits
from tpla_kernels.reference import mla_decode_reference

# (seq_lens, heads, q_len, ckv, page_size, dtype, num_kv_splits, nope_scale)
CASES = [
    ([37, 5, 64], 4, 1, 128, 16, torch.float32, None, 1.0),
    ([70, 19], 16, 1, 512, 16, torch.bfloat16, 3, 1.0),
    ([33, 1, 90], 8, 1, 256, 1, torch.float32, 2, 0.6),
    ([48, 9], 5, 3, 128, 64, torch.float32, 1, 1.3),
    ([100, 6], 16, 2, 256, 16, torch.bfloat16, 4, 0.8),
    ([71], 20, 1, 128, 4, torch.float16, 8, 1.0),
    ([200, 3, 17], 4, 3, 512, 64, torch.float32, 5, 0.5),
    ([65, 40], 8, 4, 128, 1, torch.bfloat16, None, 1.0),
]


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(relative output error, absolute LSE error) allowed for the input dtype."""
    return (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 2e-2)


@pytest.mark.parametrize("seq_lens,heads,q_len,ckv,page_size,dtype,splits,nope_scale", CASES)
def test_decode_matches_reference(
    interp: SimpleNamespace, seq_lens: list[int], heads: int, q_len: int, ckv: int, page_size: int,
    dtype: torch.dtype, splits: int | None, nope_scale: float,
) -> None:
    gen = torch.Generator().manual_seed(hash((tuple(seq_lens), heads, ckv, page_size)) % 2**31)
    case = make_paged_case(seq_lens, heads, q_len, ckv, page_size, dtype, generator=gen)
    sm_scale = 1.0 / math.sqrt(ckv + 64)
    out, lse = interp.mla_decode(*case, sm_scale, q_len=q_len, nope_scale=nope_scale, num_kv_splits=splits)
    ref_out, ref_lse = mla_decode_reference(*case, sm_scale, q_len=q_len, nope_scale=nope_scale)
    out_tol, lse_tol = _tolerance(dtype)
    assert out.dtype == dtype and out.shape == case.q_nope.shape
    assert lse.dtype == torch.float32 and lse.shape == case.q_nope.shape[:2]
    assert rel_err(out, ref_out) < out_tol
    assert (lse - ref_lse).abs().max().item() < lse_tol


@pytest.mark.parametrize("config", [
    DecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=1),
    DecodeConfig(block_h=32, block_n=64, num_warps=4, num_stages=2),
    DecodeConfig(block_h=64, block_n=32, num_warps=8, num_stages=2),
    DecodeConfig(block_h=32, block_n=16, num_warps=4, num_stages=3, ctas_per_sm=2),
])
def test_tiling_does_not_change_result(interp: SimpleNamespace, config: DecodeConfig) -> None:
    gen = torch.Generator().manual_seed(7)
    case = make_paged_case([45, 80], 24, 2, 128, 16, torch.float32, generator=gen)
    ref_out, ref_lse = mla_decode_reference(*case, 0.1, q_len=2, nope_scale=0.9)
    out = torch.full_like(case.q_nope, float("nan"))
    lse = interp.launch_mla_decode(*case, 0.1, 2, 0.9, 3, config, out)
    assert rel_err(out, ref_out) < 1e-5
    assert (lse - ref_lse).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype,q_len,page_size,block_n", [
    (torch.bfloat16, 1, 16, 16), (torch.float16, 2, 32, 16), (torch.bfloat16, 3, 16, 8),
])
def test_tma_block_loads(
    interp: SimpleNamespace, dtype: torch.dtype, q_len: int, page_size: int, block_n: int
) -> None:
    """Whole blocks by TMA, each split's partial last block by masked gathers: slots past a sequence in
    its last page hold NaN, which must never reach the output."""
    gen = torch.Generator().manual_seed(19 + q_len)
    case = make_paged_case([70, 19, 64, 33], 8, q_len, 128, page_size, dtype, generator=gen)
    for b, n in enumerate(case.seq_lens.tolist()):
        last = case.page_table[b, (n - 1) // page_size]
        case.ckv_cache[last, (n - 1) % page_size + 1 :] = float("nan")
        case.kpe_cache[last, (n - 1) % page_size + 1 :] = float("nan")
    ref_out, ref_lse = mla_decode_reference(*case, 0.1, q_len=q_len, nope_scale=0.7)
    config = DecodeConfig(block_h=16, block_n=block_n, num_warps=4, num_stages=2, tma=True)
    for splits in (1, 3):
        out = torch.full_like(case.q_nope, float("nan"))
        lse = interp.launch_mla_decode(*case, 0.1, q_len, 0.7, splits, config, out)
        assert rel_err(out, ref_out) < 1e-2
        assert (lse - ref_lse).abs().max().item() < 2e-2


def test_padding_rows_and_out_argument(interp: SimpleNamespace) -> None:
    """seq_len 0 (a padded CUDA-graph slot) yields zeros and -inf; `out` is written in place."""
    gen = torch.Generator().manual_seed(3)
    case = make_paged_case([0, 30, 0], 4, 1, 128, 16, torch.float32, generator=gen)
    out = torch.full_like(case.q_nope, float("nan"))
    for splits in (1, 4):
        res, lse = interp.mla_decode(*case, 0.2, num_kv_splits=splits, out=out)
        ref_out, ref_lse = mla_decode_reference(*case, 0.2)
        assert res.data_ptr() == out.data_ptr()
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], out[0])
        assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[2]).all()
        assert rel_err(out[1], ref_out[1]) < 1e-5
        assert (lse[1] - ref_lse[1]).abs().max().item() < 1e-4


def test_shared_prefix_pages_and_strided_pools(interp: SimpleNamespace) -> None:
    """Requests sharing prefix pages; ckv and kpe as views into one [pages, page_size, ckv + d_r] pool."""
    gen = torch.Generator().manual_seed(11)
    case = make_paged_case([50, 41, 64], 8, 1, 128, 16, torch.bfloat16, generator=gen, shared_prefix_pages=2)
    pool = torch.cat([case.ckv_cache, case.kpe_cache], dim=-1)
    strided = case._replace(ckv_cache=pool[..., :128], kpe_cache=pool[..., 128:])
    out, lse = interp.mla_decode(*strided, 0.08, num_kv_splits=2)
    ref_out, ref_lse = mla_decode_reference(*case, 0.08)
    assert rel_err(out, ref_out) < 1e-2
    assert (lse - ref_lse).abs().max().item() < 2e-2


def test_reference_matches_dense_attention() -> None:
    """The reference equals causal SDPA over the concatenated [mu*q_nope, q_pe] / [ckv, kpe] keys."""
    gen = torch.Generator().manual_seed(5)
    heads, q_len, ckv, n, mu, scale = 3, 2, 32, 23, 0.7, 0.15
    case = make_paged_case([n], heads, q_len, ckv, 4, torch.float64, d_pe=16, generator=gen)
    out, lse = mla_decode_reference(*case, scale, q_len=q_len, nope_scale=mu)
    tokens = torch.arange(n)
    ckv_seq = case.ckv_cache[case.page_table[0, tokens // 4].long(), tokens % 4]
    kpe_seq = case.kpe_cache[case.page_table[0, tokens // 4].long(), tokens % 4]
    q = torch.cat([mu * case.q_nope[0], case.q_pe[0]], dim=-1)
    k = torch.cat([ckv_seq, kpe_seq], dim=-1)
    positions = torch.arange(q_len * heads) // heads
    mask = tokens[None, :] < (n - q_len + positions + 1)[:, None]
    dense = F.scaled_dot_product_attention(q[None], k[None], ckv_seq[None], attn_mask=mask[None],
                                           scale=scale)[0]
    logits = (q @ k.T * scale).masked_fill(~mask, float("-inf"))
    assert torch.allclose(out[0], dense, atol=1e-5)
    assert torch.allclose(lse[0].double(), torch.logsumexp(logits, -1), atol=1e-5)


@pytest.mark.parametrize("field,change,match", [
    ("page_table", lambda c: c._replace(page_table=c.page_table.long()), "page_table"),
    ("seq_lens", lambda c: c._replace(seq_lens=c.seq_lens[:1]), "seq_lens"),
    ("ckv_cache", lambda c: c._replace(ckv_cache=c.ckv_cache[..., :64]), "ckv_cache"),
    ("q_pe", lambda c: c._replace(q_pe=c.q_pe.half()), "q_pe"),
    ("kpe_cache", lambda c: c._replace(kpe_cache=c.kpe_cache[:, :8]), "kpe_cache"),
])
def test_bad_inputs_raise(interp: SimpleNamespace, field: str, change, match: str) -> None:  # noqa: ANN001
    case = make_paged_case([5, 9], 4, 1, 128, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        interp.mla_decode(*change(case), 0.1)


def test_bad_scalars_raise(interp: SimpleNamespace) -> None:
    case = make_paged_case([5, 9], 4, 1, 128, 16, torch.float32)
    with pytest.raises(ValueError, match="q_len"):
        interp.mla_decode(*case, 0.1, q_len=3)
    with pytest.raises(ValueError, match="nope_scale"):
        interp.mla_decode(*case, 0.1, nope_scale=0.0)
    with pytest.raises(ValueError, match="num_kv_splits"):
        interp.mla_decode(*case, 0.1, num_kv_splits=0)
    with pytest.raises(ValueError, match="out"):
        interp.mla_decode(*case, 0.1, out=torch.empty(2, 4, 128, dtype=torch.float16))


def test_split_heuristic_fills_the_gpu() -> None:
    # Large batches already fill 132 program slots: no split, no merge pass.
    assert default_num_splits(batch=128, head_blocks=2, max_kv=32768, slots=132) == 1
    # One request of one head block at 32K spreads over many programs, within the cap.
    one = default_num_splits(batch=1, head_blocks=1, max_kv=32768, slots=132)
    assert 32 <= one <= 64
    # Short contexts are not split below the minimum split length.
    assert default_num_splits(batch=1, head_blocks=1, max_kv=512, slots=132) <= 2
    # Two resident programs per SM: twice the programs for the same batch.
    assert default_num_splits(batch=32, head_blocks=1, max_kv=16384, slots=264) == 8
    assert default_num_splits(batch=32, head_blocks=1, max_kv=16384, slots=132) == 4
