"""Plain torch reference of paged MLA/TPLA decode attention, in fp32.

It spells out the contract that the Triton kernel in :mod:`tpla_kernels.decode` must meet, one request at
a time and with no tiling, so that it can serve as an independent check.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mla_decode_reference(
    q_nope: Tensor,
    q_pe: Tensor,
    ckv_cache: Tensor,
    kpe_cache: Tensor,
    page_table: Tensor,
    seq_lens: Tensor,
    sm_scale: float,
    q_len: int = 1,
    nope_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Absorbed-form MLA (or one TPLA group) decode attention over a paged latent cache.

    Shapes: q_nope [B, q_len*H, ckv], q_pe [B, q_len*H, d_r], ckv_cache [pages, page_size, ckv],
    kpe_cache [pages, page_size, d_r], page_table [B, max_pages], seq_lens [B] (KV tokens including the
    q_len query tokens). Query row r is position r // H; position i sees tokens t < seq_len - q_len + i + 1.
    Logits are sm_scale * (nope_scale * q_nope.ckv_t + q_pe.kpe_t).

    Returns (out [B, q_len*H, ckv] in the query dtype, lse [B, q_len*H] fp32, natural log). A row that
    sees no token gets out = 0 and lse = -inf.
    """
    batch, rows, ckv = q_nope.shape
    heads = rows // q_len
    page_size = ckv_cache.shape[1]
    device = q_nope.device
    out = torch.zeros(batch, rows, ckv, dtype=torch.float32, device=device)
    lse = torch.full((batch, rows), float("-inf"), dtype=torch.float32, device=device)
    positions = torch.arange(rows, device=device) // heads
    for b in range(batch):
        n = int(seq_lens[b])
        if n == 0:
            continue
        tokens = torch.arange(n, device=device)
        pages = page_table[b, tokens // page_size].long()
        slots = tokens % page_size
        ckv = ckv_cache[pages, slots].float()
        kpe = kpe_cache[pages, slots].float()
        logits = sm_scale * (nope_scale * (q_nope[b].float() @ ckv.T) + q_pe[b].float() @ kpe.T)
        visible = tokens[None, :] < (n - q_len + positions + 1)[:, None]
        logits = logits.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(logits, dim=-1)
        probs = torch.where(visible, torch.exp(logits - row_lse[:, None]), 0.0)
        out[b] = probs @ ckv
        lse[b] = row_lse
    return out.to(q_nope.dtype), lse
