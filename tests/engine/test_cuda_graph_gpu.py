"""Decode steps replayed from CUDA graphs against the same steps run eagerly (GPU machine only)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from graph_case import prefilled_decode_entries

from tpla_serve import Engine
from tpla_serve.engine.cuda_graph import CudaGraphRunner
from tpla_serve.forward_batch import ForwardMode
from tpla_serve.models import builtin_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
MODEL = str(Path(__file__).resolve().parents[2] / "models" / "mla-tiny")
# Two dense layers at DeepSeek-V2-Lite's attention shape (16 heads, latent 512, rope 64), which FlashInfer's
# MLA kernel serves (mla-tiny's latent is too narrow for it); 8K context: a 128-page table.
FLASHINFER_ENGINE = {
    "model_path": str(builtin_config("deepseek-v2-lite")),
    "load_format": "dummy",
    "json_model_override_args": '{"num_hidden_layers": 2, "first_k_dense_replace": 9, "intermediate_size": 1408}',
    "skip_tokenizer_init": True,
    "device": "cuda",
    "dtype": "bfloat16",
    "attention_backend": "flashinfer",
    "context_length": 8192,
    "max_total_tokens": 1 << 16,
    "cuda_graph_max_bs": 24,
}
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Engine:\n    def __init__(self", "The quick brown",
           "Paged attention keeps", "x = [i * i for i in", "# TPLA splits the latent", "while True:\n"]


def _graphs(engine: Engine) -> CudaGraphRunner:
    runner = engine.runner
    max_pages = -(-runner.context_length // runner.page_size)
    graphs = CudaGraphRunner(runner.model, runner.attn_backend, runner.kv_pool, engine.config, runner.device, max_pages)
    graphs.capture()
    assert graphs.disabled_reason is None and graphs.graphs
    return graphs


@pytest.mark.parametrize("dtype,dense", [("float32", True), ("bfloat16", True), ("bfloat16", False)])
def test_replayed_step_equals_eager_step(dtype: str, dense: bool) -> None:
    """mla-tiny (MoE: 8 experts, top-2) and its dense variant, every bucket up to cuda_graph_max_bs."""
    kw = {"load_format": "dummy", "json_model_override_args": '{"first_k_dense_replace": 99}'} if dense else {}
    with Engine(model_path=MODEL, device="cuda", dtype=dtype, attention_backend="triton", disable_cuda_graph=True,
                cuda_graph_max_bs=32, **kw) as engine:
        graphs = _graphs(engine)
        assert graphs.batch_sizes == [1, 2, 4, 8, 16, 24, 32]
        for i, batch in enumerate([1, 3, 4, 5, 16, 30]):
            entries = prefilled_decode_entries(engine.runner, [5 + 37 * j % 300 for j in range(batch)], seed=i)
            assert graphs.can_run(ForwardMode.DECODE, entries)
            eager = engine.runner.forward(ForwardMode.DECODE, entries)
            replayed = graphs.replay(entries)
            assert replayed.shape == eager.shape and replayed.dtype == torch.float32
            if dtype == "float32":
                torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
            else:
                # The graph's attention runs with its bucket's KV splits, so bf16 rounding differs from the
                # eager step's; in the MoE model that can flip a near-tie routing choice of a later layer.
                err = float((replayed - eager).norm() / eager.norm())
                assert err < (1e-2 if dense else 3e-2), f"batch {batch}: relative error {err}"
            for e in entries:
                engine.runner.allocator.free(e.pages)
        assert graphs.num_replays == 6
        too_many = prefilled_decode_entries(engine.runner, [3] * (graphs.batch_sizes[-1] + 1), seed=9)
        assert not graphs.can_run(ForwardMode.DECODE, too_many)


def test_step_from_the_request_table_replays_like_the_eager_step() -> None:
    """The decode loop's path: inputs gathered from the request table into the graph's buffers by device
    copies (rows past the batch padding) against the same step laid out eagerly from the table."""
    kw = {"load_format": "dummy", "json_model_override_args": '{"first_k_dense_replace": 99}'}
    with Engine(model_path=MODEL, device="cuda", dtype="float32", attention_backend="triton",
                disable_cuda_graph=True, cuda_graph_max_bs=32, **kw) as engine:
        graphs = _graphs(engine)
        runner, table = engine.runner, engine.runner.table
        for i, batch in enumerate([1, 3, 16, 30]):
            entries = prefilled_decode_entries(runner, [5 + 41 * j % 300 for j in range(batch)], seed=10 + i)
            slots = np.array(random.Random(i).sample(range(table.max_slots), batch), dtype=np.int64)
            for slot, e in zip(slots, entries):
                table.set_pages(int(slot), 0, e.pages)
                table.set_token(int(slot), e.new_token_ids[0])
            positions = np.array([e.prefix_len for e in entries], dtype=np.int64)
            eager = runner.decode_local(slots, positions, table.take_delta())
            replayed = graphs.replay_from_table(table, slots, positions)
            torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
            for e in entries:
                runner.allocator.free(e.pages)


def _greedy(dtype: str, graphs_on: bool, prompts: list[str]) -> tuple[list[list[int]], list, int]:
    with Engine(model_path=MODEL, device="cuda", dtype=dtype, attention_backend="triton",
                disable_cuda_graph=not graphs_on) as engine:
        outs = engine.generate(prompts, {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True},
                               return_logprob=True, top_logprobs_num=2)
        runner_graphs = getattr(engine.runner, "cuda_graph", None)
        replays = runner_graphs.num_replays if runner_graphs is not None else 0
        return [o["output_ids"] for o in outs], [o["meta_info"]["output_top_logprobs"] for o in outs], replays


def test_moe_graphs_off_outside_bfloat16() -> None:
    """torch's grouped GEMM falls back to a host-synchronizing loop in float32: the engine runs eagerly."""
    with Engine(model_path=MODEL, device="cuda", dtype="float32", attention_backend="triton") as engine:
        assert engine.runner.cuda_graph is not None and not engine.runner.cuda_graph.graphs
        assert "float32" in engine.runner.cuda_graph.disabled_reason
        assert len(engine.generate(PROMPTS[:2], {"max_new_tokens": 4})) == 2


@pytest.mark.parametrize("dtype", ["bfloat16"])
@pytest.mark.parametrize("num_prompts", [1, 3, 6])  # bucket 1, padded into buckets 4 and 8
def test_greedy_outputs_with_and_without_graphs(dtype: str, num_prompts: int) -> None:
    """Identical greedy tokens; in bf16 up to the first step whose top-2 logprobs are within 0.05 (a near-tie
    that rounding may decide either way)."""
    prompts = PROMPTS[:num_prompts]
    on, _, replays = _greedy(dtype, True, prompts)
    off, tops, _ = _greedy(dtype, False, prompts)
    assert replays > 0, "ModelRunner did not replay CUDA graphs (is CudaGraphRunner wired into it?)"
    for a, b, top in zip(on, off, tops):
        if dtype == "float32":
            assert a == b
        else:
            tie = next((i for i, t in enumerate(top) if t is not None and t[0][0] - t[1][0] < 0.05), len(b))
            assert a[:tie] == b[:tie]


def test_flashinfer_replayed_step_equals_eager_step() -> None:
    """FlashInfer plans every replay with the step's lengths: batches that fill or pad their bucket, short
    and long requests in one full-width graph, lengths at and across page boundaries."""
    pytest.importorskip("flashinfer", reason="flashinfer is not installed (pip install flashinfer-python)")
    with Engine(**FLASHINFER_ENGINE, disable_cuda_graph=True) as engine:
        graphs = _graphs(engine)
        assert graphs.widths == [128]  # FlashInfer plans its KV splits per replay: one width serves all
        cases = [
            [4700],  # bucket 1
            [63, 4095, 200],  # bucket 4: 4096 tokens after the step fill 64 pages exactly
            [4700, 1, 63, 64, 65, 4095, 4096] + [97 * j % 3000 + 2 for j in range(10)],  # bucket 24
        ]
        for i, prompt_lens in enumerate(cases):
            entries = prefilled_decode_entries(engine.runner, prompt_lens, seed=i)
            assert graphs.can_run(ForwardMode.DECODE, entries)
            eager = engine.runner.forward(ForwardMode.DECODE, entries)
            replayed = graphs.replay(entries)
            assert replayed.shape == eager.shape and torch.isfinite(replayed).all()
            err = float((replayed - eager).norm() / eager.norm())
            assert err < 1e-2, f"batch {len(prompt_lens)}: relative error {err}"
            for e in entries:
                engine.runner.allocator.free(e.pages)
        assert graphs.num_replays == len(cases)


def _flashinfer_greedy(graphs_on: bool, prompts: list[list[int]]) -> tuple[list[list[int]], list, int]:
    from tpla_serve.layers.attention.flashinfer_backend import FlashInferAttentionBackend

    with Engine(**FLASHINFER_ENGINE, disable_cuda_graph=not graphs_on) as engine:
        assert isinstance(engine.runner.attn_backend, FlashInferAttentionBackend)
        graphs = engine.runner.cuda_graph
        if graphs_on:
            assert graphs is not None and graphs.disabled_reason is None, "FlashInfer decode was not captured"
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 16, "temperature": 0,
                               "ignore_eos": True}, return_logprob=True, top_logprobs_num=2)
        replays = graphs.num_replays if graphs is not None else 0
        return [o["output_ids"] for o in outs], [o["meta_info"]["output_top_logprobs"] for o in outs], replays


def test_flashinfer_greedy_outputs_with_and_without_graphs() -> None:
    """Identical greedy tokens up to the first step whose top-2 logprobs are within 0.05 (a near-tie that
    bf16 rounding may decide either way; dummy weights give flat logits)."""
    pytest.importorskip("flashinfer", reason="flashinfer is not installed (pip install flashinfer-python)")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 102400, (n,), generator=gen).tolist() for n in (5, 300, 4200)]
    on, _, replays = _flashinfer_greedy(True, prompts)
    off, tops, _ = _flashinfer_greedy(False, prompts)
    assert replays > 0
    for a, b, top in zip(on, off, tops):
        assert len(a) == len(b) == 16
        tie = next((i for i, t in enumerate(top) if t is not None and t[0][0] - t[1][0] < 0.05), len(b))
        assert a[:tie] == b[:tie]
