"""The CUDA-graph runner's host side: buckets, padded step layout, refusal on CPU (the graphs: GPU tests)."""

from __future__ import annotations

import pytest
import torch
from graph_case import prefilled_decode_entries

from tpla_serve import Engine
from tpla_serve.engine.cuda_graph import CudaGraphRunner, capture_batch_sizes, pad_decode_inputs
from tpla_serve.engine.forward_batch import ForwardBatch, ForwardMode


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


def test_padded_step_equals_eager_step(engine):
    """Padding rows (page 0, one token) leave the real rows' logits as an unpadded step computes them."""
    runner = engine.runner
    entries = prefilled_decode_entries(runner, [7, 13, 2], seed=5)
    eager = runner.forward(ForwardMode.DECODE, entries)
    max_pages = max(len(e.pages) for e in entries) + 2
    inputs = pad_decode_inputs(entries, 4, max_pages, runner.page_size)
    assert inputs.page_table[3].eq(0).all() and inputs.seq_lens[3] == 1 and inputs.out_cache_loc[3] == 0
    seq_lens = inputs.seq_lens.tolist()
    fb = ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=inputs.input_ids,
        positions=inputs.positions,
        q_lens=[1] * 4,
        seq_lens=seq_lens,
        qo_indptr=torch.arange(5),
        kv_indptr=torch.tensor([0, *seq_lens]).cumsum(0),
        out_cache_loc=inputs.out_cache_loc,
        page_table=inputs.page_table,
        seq_lens_t=inputs.seq_lens,
        logits_indices=torch.arange(4),
        kv_pool=runner.kv_pool,
        attn_backend=runner.attn_backend,
    )
    runner.attn_backend.prepare(fb)
    with torch.inference_mode():
        padded = runner.model(fb)
    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)
    for e in entries:
        runner.allocator.free(e.pages)


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


def test_page_widths_step_by_four_from_4k_tokens():
    from tpla_serve.engine.cuda_graph import page_widths

    assert page_widths(2560, 64) == [64, 256, 1024, 2560]
    assert page_widths(64, 64) == [64]
    assert page_widths(16, 64) == [16]
    assert page_widths(300, 16) == [256, 300]
