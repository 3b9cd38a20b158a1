"""The EXTEND step's KV layout: each distinct slot once, each request's keys as runs of those rows, checked
against the slots its page table names (kv_indices), and attention over the runs against a dense reference."""

from __future__ import annotations

import random

import pytest
import torch

from tpla_serve.forward_batch import BatchEntry, extend_kv
from tpla_serve.layers.attention.torch_backend import TorchAttentionBackend
from tpla_serve.layers.attention.sdpa_extend import plan_groups, sdpa_extend


def _entries(rng: random.Random, page_size: int) -> list[BatchEntry]:
    """Requests reading prefixes of a few cached page chains (whole pages), then pages of their own that
    may hold an earlier chunk (a prefix ending mid-page) before the new tokens: ragged lengths."""
    free = iter(range(1, 10_000))
    chains = [[next(free) for _ in range(rng.randint(1, 6))] for _ in range(3)]
    entries = []
    for _ in range(rng.randint(1, 9)):
        shared = rng.choice(chains)[: rng.randint(0, 6)]
        prefix_len = len(shared) * page_size + rng.choice([0, rng.randint(0, 2 * page_size)])
        q_len = rng.randint(1, 3 * page_size)
        own = -(-(prefix_len + q_len) // page_size) - len(shared)
        entries.append(BatchEntry(list(range(q_len)), prefix_len, shared + [next(free) for _ in range(own)]))
    return entries


def _slots(e: BatchEntry, page_size: int) -> list[int]:
    return [e.pages[t // page_size] * page_size + t % page_size for t in range(e.prefix_len + len(e.new_token_ids))]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_runs_name_every_requests_slots_in_order_and_each_slot_once(seed: int, page_size: int) -> None:
    entries = _entries(random.Random(seed), page_size)
    layout = extend_kv(entries, page_size, "cpu")
    if all(e.prefix_len == 0 for e in entries):
        assert layout.slots is None
        slots = torch.tensor([s for e in entries for s in _slots(e, page_size)])
    else:
        assert layout.slots is not None
        slots = layout.slots
        distinct = {s for e in entries for s in _slots(e, page_size)}
        assert slots.numel() == len(distinct) == len(set(slots.tolist()))
    for e, runs in zip(entries, layout.runs):
        got = torch.cat([slots[a:b] for a, b in runs]).tolist()
        assert got == _slots(e, page_size)
        assert len(runs) <= len(e.pages)


@pytest.mark.parametrize("seed", [3, 5, 8])
@pytest.mark.parametrize("backend", ["torch", "sdpa", "sdpa in small groups"])
def test_attention_over_runs_equals_dense_causal_attention_per_request(backend: str, seed: int) -> None:
    """The torch backend's per-request attention and the GPU backends' batched SDPA (one padded call per
    group of requests; with a small budget, several groups) against dense fp64 attention per request."""
    torch.manual_seed(seed)
    page_size, heads, dqk, dv = 16, 4, 24, 8
    entries = _entries(random.Random(seed), page_size)
    layout = extend_kv(entries, page_size, "cpu")
    rows = layout.slots.numel() if layout.slots is not None else sum(len(e.new_token_ids) for e in entries)
    k, v = torch.randn(rows, heads, dqk), torch.randn(rows, heads, dv)
    q_lens = [len(e.new_token_ids) for e in entries]
    seq_lens = [e.prefix_len + n for e, n in zip(entries, q_lens)]
    q = torch.randn(sum(q_lens), heads, dqk)

    class Step:  # the fields the backends' extend reads
        extend_kv = layout
        input_ids = torch.zeros(0)  # its device
        sdpa_groups = None

        def __init__(self) -> None:
            self.q_lens, self.seq_lens = q_lens, seq_lens
            self.batch_size = len(q_lens)

        @staticmethod
        def future_mask(n: int) -> torch.Tensor:
            return torch.ones(n, n, dtype=torch.bool).triu(1)

        def causal_mask(self, i: int) -> torch.Tensor:
            n, length = self.q_lens[i], self.seq_lens[i]
            return torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]

    step = Step()
    if backend == "sdpa in small groups":
        row_bytes = heads * (dqk + dv) * k.element_size()
        step.sdpa_groups = plan_groups(step, row_bytes, max_bytes=2 * max(seq_lens) * row_bytes)  # type: ignore[arg-type]
        assert len(step.sdpa_groups) > 1 or len(entries) <= 2
    attend = TorchAttentionBackend().extend if backend == "torch" else sdpa_extend
    out = attend(q, k, v, step, 0.3)  # type: ignore[arg-type]
    q0 = 0
    for n, length, runs in zip(q_lens, seq_lens, layout.runs):
        ki, vi = torch.cat([k[a:b] for a, b in runs]), torch.cat([v[a:b] for a, b in runs])
        scores = torch.einsum("qhd,khd->hqk", q[q0 : q0 + n].double(), ki.double()) * 0.3
        visible = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
        ref = torch.einsum("hqk,khd->qhd", torch.softmax(scores.masked_fill(~visible, float("-inf")), -1), vi.double())
        torch.testing.assert_close(out[q0 : q0 + n].double(), ref, atol=1e-5, rtol=1e-5)
        q0 += n


def test_a_batch_without_prefixes_keeps_its_new_tokens_as_the_rows() -> None:
    entries = [BatchEntry([1, 2, 3], 0, [5]), BatchEntry([4] * 20, 0, [7, 2])]
    layout = extend_kv(entries, 16, "cpu")
    assert layout.slots is None and layout.runs == [[(0, 3)], [(3, 23)]]
