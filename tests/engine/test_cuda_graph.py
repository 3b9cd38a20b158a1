"""The CUDA-graph runner's host side: buckets, static inputs and their plans, refusals (graphs: GPU tests)."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import torch
from graph_case import prefilled_decode_entries

from tpla_serve import Engine
from tpla_serve.engine.cuda_graph import (
    CudaGraphRunner,
    StaticDecodeBatch,
    capture_batch_sizes,
    pad_decode_inputs,
)
from tpla_serve.forward_batch import BatchEntry, ForwardBatch, ForwardMode
from tpla_serve.layers.attention.flashinfer_backend import FlashInferAttentionBackend, page_indices
from tpla_serve.layers.attention.torch_backend import TorchAttentionBackend
from tpla_serve.layers.attention.triton_backend import TritonAttentionBackend


def test_capture_batch_sizes():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(4) == [1, 2, 4]
    assert capture_batch_sizes(6) == [1, 2, 4, 6]
    assert capture_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert capture_batch_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 100]
    with pytest.raises(ValueError, match="max_bs"):
        capture_batch_sizes(0)


@pytest.fixture(scope="module")
def engine(tiny_v3_dir):
    return Engine(model_path=str(tiny_v3_dir), dtype="float32", device="cpu", page_size=4)


class RecordingTorchBackend(TorchAttentionBackend):
    """The torch backend, noting what each graph plan was handed: the key, the host lengths, and the
    page table and lengths the static buffers held at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.plans: list[tuple[Hashable, list[int], list[int], torch.Tensor, torch.Tensor]] = []

    def prepare_graph(self, key: Hashable, fb: ForwardBatch) -> None:
        buffers = (fb.page_table.clone(), fb.seq_lens_t.clone())
        self.plans.append((key, list(fb.q_lens), list(fb.seq_lens), *buffers))


def test_static_batch_plans_each_loaded_step(engine):
    """Each step is copied into the static buffers before its graph is planned; the batch the plan sees
    holds the step's real lengths (padding rows: one token on page 0) and, run eagerly, gives the
    unpadded step's logits, whatever earlier, larger steps left in the buffers."""
    runner = engine.runner
    backend = RecordingTorchBackend()
    static = StaticDecodeBatch(8, 12, runner.kv_pool, backend, runner.device)
    fb = static.planned_batch(4, 8, [1] * 4)  # capture-time contents
    assert backend.plans[-1][:3] == ((4, 8), [1] * 4, [1] * 4) and fb.page_table.shape == (4, 8)
    for seed, (prompt_lens, bs, width) in enumerate([([7, 13, 2], 4, 8), ([30, 5], 2, 12), ([3], 1, 2)]):
        entries = prefilled_decode_entries(runner, prompt_lens, seed=seed)
        eager = runner.forward(ForwardMode.DECODE, entries)
        fb = static.load(entries, bs, width)
        key, q_lens, seq_lens, table, lens_t = backend.plans[-1]
        pad = bs - len(entries)
        assert key == (bs, width) and q_lens == [1] * bs
        assert seq_lens == [n + 1 for n in prompt_lens] + [1] * pad and lens_t.tolist() == seq_lens
        expected = torch.zeros(bs, width, dtype=torch.int32)
        for row, e in zip(expected, entries):
            row[: len(e.pages)] = torch.tensor(e.pages)
        assert torch.equal(table, expected)
        with torch.inference_mode():
            logits = runner.model(fb)
        torch.testing.assert_close(logits[: len(entries)], eager, rtol=1e-5, atol=1e-5)
        for e in entries:
            runner.allocator.free(e.pages)
    assert len(backend.plans) == 4


def test_pad_rejects_steps_a_graph_cannot_hold(engine):
    entries = prefilled_decode_entries(engine.runner, [5], seed=1)
    with pytest.raises(ValueError, match="bucket"):
        pad_decode_inputs(entries * 3, 2, 8, 4)
    with pytest.raises(ValueError, match="pages"):
        pad_decode_inputs(entries, 1, 1, 4)
    engine.runner.allocator.free(entries[0].pages)


def test_runner_refuses_cpu(engine):
    runner = engine.runner
    graphs = CudaGraphRunner(runner.model, runner.attn_backend, runner.kv_pool, engine.config, runner.device, 8)
    assert graphs.disabled_reason is not None and "cpu" in graphs.disabled_reason
    graphs.capture()
    assert not graphs.can_run(ForwardMode.DECODE, prefilled_decode_entries(runner, [3], seed=2))


def test_runner_refuses_backends_that_cannot_be_captured(engine):
    """Nothing touches the device before the backend is refused, so a cuda device needs no GPU here."""
    runner = engine.runner
    assert TritonAttentionBackend.capturable and FlashInferAttentionBackend.capturable
    assert not TorchAttentionBackend.capturable
    graphs = CudaGraphRunner(runner.model, TorchAttentionBackend(), runner.kv_pool, engine.config,
                             torch.device("cuda"), 8)
    assert graphs.disabled_reason is not None and "TorchAttentionBackend" in graphs.disabled_reason


def test_flashinfer_page_indices_from_a_strided_table():
    """FlashInfer's kv_indices: each request's first pages, in order, read through a view of a wider table
    (a graph's corner of its static page table)."""
    gen = torch.Generator().manual_seed(3)
    table = torch.randint(1, 1000, (6, 10), generator=gen, dtype=torch.int32)
    view = table[:4, :7]
    num_pages = [3, 7, 1, 5]
    got = page_indices(view, num_pages)
    expected = torch.tensor([int(view[i, j]) for i, n in enumerate(num_pages) for j in range(n)]).int()
    assert got.dtype == torch.int32 and torch.equal(got, expected)
    for bad in ([3, 8, 1, 5], [3, 0, 1, 5], [3, 7, 1]):
        with pytest.raises(ValueError, match="page counts"):
            page_indices(view, bad)


def test_page_widths_step_by_four_from_4k_tokens():
    from tpla_serve.engine.cuda_graph import page_widths

    assert page_widths(2560, 64) == [64, 256, 1024, 2560]
    assert page_widths(64, 64) == [64]
    assert page_widths(16, 64) == [16]
    assert page_widths(300, 16) == [256, 300]


def test_static_batch_of_query_blocks_runs_the_verification_step(engine):
    """k + 1 new tokens per request (speculative verification) through the static buffers, run eagerly: the
    logits of every real token equal the step's own; padding rows are q_len tokens on page 0."""
    runner = engine.runner
    q_len = 3
    static = StaticDecodeBatch(8, 12, runner.kv_pool, TorchAttentionBackend(), runner.device, max_q_len=q_len)
    singles = prefilled_decode_entries(runner, [7, 13, 2], seed=5)
    for e in singles:  # room for the block
        e.pages.extend(runner.allocator.alloc(1))
    entries = [BatchEntry([e.new_token_ids[0], 11, 12], e.prefix_len, e.pages, logits_for_all=True)
               for e in singles]
    eager = runner.forward(ForwardMode.DECODE, entries)
    fb = static.load(entries, 4, 8, q_len)
    assert fb.q_lens == [q_len] * 4 and fb.seq_lens == [10, 16, 5, 3]
    assert fb.positions.tolist()[-q_len:] == [0, 1, 2] and fb.out_cache_loc.tolist()[-q_len:] == [0, 1, 2]
    assert fb.qo_indptr.tolist() == [0, 3, 6, 9, 12]
    with torch.inference_mode():
        logits = runner.model(fb)
    torch.testing.assert_close(logits[: 3 * q_len], eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 new tokens"):
        pad_decode_inputs(singles, 4, 8, 4, q_len)
    for e in singles:
        runner.allocator.free(e.pages)


def test_runner_keeps_query_blocks_only_where_the_backend_captures_them(engine):
    """Verification steps of k + 1 tokens are captured on Triton's kernel; FlashInfer's plans one token per
    request (the backends are not built: nothing here needs a GPU)."""
    runner = engine.runner
    kw = {"config": engine.config, "device": runner.device, "max_pages": 8, "q_lens": (1, 5)}
    triton = CudaGraphRunner(runner.model, TritonAttentionBackend.__new__(TritonAttentionBackend),
                             runner.kv_pool, **kw)
    flashinfer = CudaGraphRunner(runner.model, FlashInferAttentionBackend.__new__(FlashInferAttentionBackend),
                                 runner.kv_pool, **kw)
    assert triton.q_lens == (1, 5) and flashinfer.q_lens == (1,)
