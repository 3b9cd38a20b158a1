"""Prefill attention in MHA form for the GPU backends: torch's fused SDPA, the step's requests batched.

A step's requests (a cached prefix's rows and their own, `ForwardBatch.extend_kv`) are gathered into padded
[b, L_max] key and [b, Q_max] query blocks, grouped by key length so that padding stays small and no group
gathers more than `PADDED_BYTES`, with one mask per group (bottom-right causal, padding hidden): one SDPA
call per group and layer instead of one per request, whose launches and Python dominate a step of many
short requests over a shared prefix. The plan (indices, masks) is built once per step and shared by every
layer. A step without a cached prefix, or of one request, keeps one call per request (no gather, and causal
SDPA without a mask where a request has no prefix).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from tpla_serve.forward_batch import ForwardBatch

PADDED_BYTES = 1 << 30  # keys and values one group gathers at most


class SdpaGroup(NamedTuple):
    """Requests attended in one SDPA call: the q rows and k/v rows of each (padded with row 0), the mask,
    and where the real query rows' outputs go."""

    q_rows: torch.Tensor  # [b, Q_max] int64
    kv_rows: torch.Tensor  # [b, L_max] int64
    mask: torch.Tensor  # [b, 1, Q_max, L_max] bool: True where a query sees a key
    valid: torch.Tensor  # [sum(q_len)] int64: the real query rows among the b * Q_max padded ones
    out_rows: torch.Tensor  # [sum(q_len)] int64: their rows of the output


def plan_groups(fb: ForwardBatch, kv_row_bytes: int, max_bytes: int = PADDED_BYTES) -> list[SdpaGroup]:
    """The step's SDPA groups: requests sorted by key length, each group as many as fit in max_bytes of
    padded keys and values (kv_row_bytes per key row, all heads)."""
    assert fb.extend_kv is not None, "an EXTEND batch carries its KV layout"
    q_lens, kv_lens = np.asarray(fb.q_lens), np.asarray(fb.seq_lens)
    q_starts = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
    order = np.argsort(kv_lens, kind="stable")
    groups, members = [], []
    for i in order:
        if members and (len(members) + 1) * kv_lens[i] * kv_row_bytes > max_bytes:
            groups.append(members)
            members = []
        members.append(int(i))
    groups.append(members)
    device = fb.input_ids.device
    plans = []
    for members in groups:
        q_max, l_max = int(q_lens[members].max()), int(kv_lens[members].max())
        q_rows = np.zeros((len(members), q_max), dtype=np.int64)
        kv_rows = np.zeros((len(members), l_max), dtype=np.int64)
        for r, i in enumerate(members):
            q_rows[r, : q_lens[i]] = np.arange(q_starts[i], q_starts[i] + q_lens[i])
            kv_rows[r, : kv_lens[i]] = np.concatenate([np.arange(a, b) for a, b in fb.extend_kv.runs[i]])
        q_len = torch.from_numpy(q_lens[members]).to(device)[:, None, None]
        kv_len = torch.from_numpy(kv_lens[members]).to(device)[:, None, None]
        t = torch.arange(q_max, device=device)[None, :, None]
        j = torch.arange(l_max, device=device)[None, None, :]
        mask = (j <= kv_len - q_len + t) & (j < kv_len)  # padded keys hidden; padding queries' rows dropped
        valid = np.arange(q_max)[None, :] < q_lens[members][:, None]
        plans.append(SdpaGroup(
            torch.from_numpy(q_rows).to(device), torch.from_numpy(kv_rows).to(device), mask[:, None],
            torch.from_numpy(np.flatnonzero(valid)).to(device), torch.from_numpy(q_rows[valid]).to(device),
        ))
    return plans


def sdpa_extend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch, scale: float) -> torch.Tensor:
    """Causal attention of every request's new tokens q [N, H, D] over its keys k [U, H, D], v [U, H, Dv]
    (the rows of its runs): [N, H, Dv]. Batched when a prefix came from the cache (the step then holds many
    short requests, as after a shared system prompt), else one call per request."""
    assert fb.extend_kv is not None, "an EXTEND batch carries its KV layout"
    if fb.batch_size == 1 or fb.extend_kv.slots is None:
        return _per_request(q, k, v, fb, scale)
    if fb.sdpa_groups is None:
        fb.sdpa_groups = plan_groups(fb, k.shape[1] * (k.shape[2] + v.shape[2]) * k.element_size())
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    for g in fb.sdpa_groups:
        b, q_max = g.q_rows.shape
        qg, kg, vg = q[g.q_rows], k[g.kv_rows], v[g.kv_rows]  # [b, Q_max | L_max, H, D]
        o = F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2),
                                           attn_mask=g.mask, scale=scale)  # [b, H, Q_max, Dv]
        rows = o.transpose(1, 2).reshape(b * q_max, o.shape[1], o.shape[3])
        out.index_copy_(0, g.out_rows, rows.index_select(0, g.valid))  # indices, not a mask: no host sync
    return out


def _per_request(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch, scale: float) -> torch.Tensor:
    """One SDPA call per request over its key runs (concatenated when more than one)."""
    assert fb.extend_kv is not None
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    q_start = 0
    for i, (q_len, kv_len, runs) in enumerate(zip(fb.q_lens, fb.seq_lens, fb.extend_kv.runs)):
        qi = q[q_start : q_start + q_len].transpose(0, 1)
        ki, vi = (torch.cat([t[a:b] for a, b in runs]) if len(runs) > 1 else t[runs[0][0] : runs[0][1]]
                  for t in (k, v))
        ki, vi = ki.transpose(0, 1), vi.transpose(0, 1)
        if q_len == kv_len:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=fb.causal_mask(i), scale=scale)
        out[q_start : q_start + q_len] = o.transpose(0, 1)
        q_start += q_len
    return out
