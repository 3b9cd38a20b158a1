"""Speculative blocks in CUDA graphs (run on the GPU machine, not in CI), against the same steps run eagerly.

bfloat16 (torch's grouped GEMM of the MoE layers is captured only there), Triton attention: the draft's
decode steps (in layer groups under EasySpec, one batched call per group) and its k + 1-token calibrations,
the target's verification over k + 1 tokens per request, each replayed from its graph and compared with the
eager step on the same inputs; a graph's attention sizes its KV splits by its bucket, so bf16 rounding
differs from the eager step's and the logits are compared by relative error, as in test_cuda_graph_gpu.
End to end, blocks replay every kind of graph and accept as often as eager blocks. EasySpec's batched
attention sublayers are also checked in float32 against the layers run one by one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from easyspec_reference import grouped_logits

from tpla_serve import Engine
from tpla_serve.forward_batch import BatchEntry, ForwardMode, build_forward_batch

pytestmark = [
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
]

ROOT = Path(__file__).resolve().parents[2]
TARGET = str(ROOT / "models" / "mla-tiny")
DRAFT = str(ROOT / "models" / "mla-tiny-draft")
K = 4
PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import numpy as np\n",
           "class Engine:\n    def __init__(self", "for i in range(10):", "# A function that sorts a list\n"]
PARAMS = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in (9, 17, 32, 48, 40, 25)]


def _engine(algorithm: str, dtype: str = "bfloat16", **kw) -> Engine:
    return Engine(
        model_path=TARGET, device="cuda", dtype=dtype, attention_backend="triton", cuda_graph_max_bs=8,
        speculative_algorithm=algorithm, speculative_draft_model_path=DRAFT, speculative_num_draft_tokens=K,
        **kw,
    )


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _prefilled(
    engine: Engine, lengths: list[int], seed: int
) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    """Random prompts of `lengths` prefilled into the target's and the draft's pools, slots in the request
    table: (prompts, pages, slots); each request has room for K + 1 more tokens."""
    runner, draft = engine.runner, engine.scheduler.spec.draft
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 4096, (n,), generator=gen).tolist() for n in lengths]
    pages = [runner.allocator.alloc(-(-(n + K + 1) // runner.page_size)) for n in lengths]
    entries = [BatchEntry(p, 0, pg) for p, pg in zip(prompts, pages)]
    runner.forward(ForwardMode.EXTEND, entries)
    draft.forward(ForwardMode.EXTEND, entries)
    slots = []
    for pg in pages:
        slot = runner.table.acquire()
        runner.table.set_pages(slot, 0, pg)
        slots.append(slot)
    runner.table.apply(runner.table.take_delta())
    return prompts, pages, np.array(slots, dtype=np.int64)


def _release(engine: Engine, pages: list[list[int]], slots: np.ndarray) -> None:
    for pg, slot in zip(pages, slots.tolist()):
        engine.runner.allocator.free(pg)
        engine.runner.table.release(slot)


@pytest.mark.parametrize("algorithm", ["standard", "easyspec"])
def test_draft_graphs_equal_eager_steps(algorithm: str) -> None:
    with _engine(algorithm) as engine:
        runner, draft = engine.runner, engine.scheduler.spec.draft
        graphs = draft.cuda_graph
        assert graphs is not None and graphs.graphs, graphs and graphs.disabled_reason
        assert graphs.q_lens == (1, K + 1) and draft.calibration_tokens == K + 1
        for seed, lengths in enumerate([[37], [5, 90, 300], [12, 64, 200, 7, 150]]):
            prompts, pages, slots = _prefilled(engine, lengths, seed)
            positions = np.array(lengths, dtype=np.int64)
            tokens = torch.tensor([p[-1] for p in prompts], device="cuda")
            with torch.inference_mode():
                fb = runner.table.decode_batch(slots, positions, draft.kv_pool, draft.attn_backend, tokens)
                draft.attn_backend.prepare(fb)
                eager = draft._run(fb, grouped=True, logits=True)
            replayed = graphs.replay_from_table(runner.table, slots, positions, tokens)
            assert replayed.shape == eager.shape
            assert _rel_err(replayed, eager) < 3e-2, f"decode step {lengths}"

            # Calibration over each prompt's last K + 1 tokens: exact, sequential layers.
            entries = [BatchEntry(p[-(K + 1):], n - K - 1, pg) for p, n, pg in zip(prompts, lengths, pages)
                       if n > K + 1]
            with torch.inference_mode():
                fb = build_forward_batch(
                    ForwardMode.DECODE, entries, draft.kv_pool, draft.attn_backend, "cuda"
                )
                draft.attn_backend.prepare(fb)
                eager = draft._run(fb, grouped=False, logits=True)
            assert graphs.can_run(ForwardMode.DECODE, entries)
            replayed = draft.forward_local(ForwardMode.DECODE, entries, exact=True)
            assert replayed.shape == eager.shape == (len(entries), 4096)
            assert _rel_err(replayed, eager) < 3e-2, f"calibration {lengths}"
            _release(engine, pages, slots)
        assert graphs.num_replays >= 6


def test_verification_graph_equals_eager_step() -> None:
    with _engine("standard") as engine:
        runner = engine.runner
        graphs = runner.cuda_graph
        assert graphs is not None and graphs.graphs and graphs.q_lens == (1, K + 1)
        for seed, lengths in enumerate([[40], [3, 77, 260, 18]]):
            prompts, pages, slots = _prefilled(engine, lengths, seed + 10)
            gen = torch.Generator().manual_seed(seed)
            entries = [BatchEntry([p[-1], *torch.randint(2, 4096, (K,), generator=gen).tolist()], n, pg,
                                  logits_for_all=True) for p, n, pg in zip(prompts, lengths, pages)]
            with torch.inference_mode():
                fb = build_forward_batch(
                    ForwardMode.DECODE, entries, runner.kv_pool, runner.attn_backend, "cuda"
                )
                runner.attn_backend.prepare(fb)
                eager = runner.model(fb)
            assert graphs.can_run(ForwardMode.DECODE, entries)
            replayed = graphs.replay(entries)
            assert replayed.shape == eager.shape == (len(lengths) * (K + 1), 4096)
            assert _rel_err(replayed, eager) < 3e-2, f"verification {lengths}"
            _release(engine, pages, slots)


@pytest.mark.parametrize("algorithm", ["standard", "easyspec"])
def test_blocks_replay_graphs_and_accept_as_eager_blocks(algorithm: str) -> None:
    with _engine(algorithm, disable_cuda_graph=True) as engine:
        eager = engine.generate(PROMPTS, PARAMS)
    with _engine(algorithm) as engine:
        outs = engine.generate(PROMPTS, PARAMS)
        draft_replays = engine.scheduler.spec.draft.cuda_graph.num_replays
        target_replays = engine.runner.cuda_graph.num_replays
    assert [len(o["output_ids"]) for o in outs] == [p["max_new_tokens"] for p in PARAMS]
    assert draft_replays > 0 and target_replays > 0

    def accept_rate(results: list[dict]) -> float:
        proposed = sum(o["meta_info"]["spec_num_proposed_drafts"] for o in results)
        return sum(o["meta_info"]["spec_num_correct_drafts"] for o in results) / proposed

    graphed, eagerly = accept_rate(outs), accept_rate(eager)
    # bfloat16 graphs and eager steps round differently, so drafts diverge on near ties; drafts from broken
    # graphs would be accepted at random (rate ~0), not within 0.1 of the eager blocks
    assert graphed > 0.2 and abs(graphed - eagerly) < 0.1, (graphed, eagerly)


def test_batched_attention_sublayers_on_gpu_equal_the_layers_one_by_one() -> None:
    """float32, eagerly: the one-device EasySpec step (groups [0], [1..4], [5]) through the Triton kernel over
    the layer-range view of the pool equals the group's layers run one at a time."""
    with _engine("easyspec", dtype="float32", easyspec_group_size=4, disable_cuda_graph=True) as engine:
        runner, draft = engine.runner, engine.scheduler.spec.draft
        assert list(draft.batched) == [1]
        lengths = [21, 140, 3]
        prompts, pages, slots = _prefilled(engine, lengths, seed=3)
        positions = np.array(lengths, dtype=np.int64)
        tokens = torch.tensor([p[-1] for p in prompts], device="cuda")
        batched = draft.decode_from_table(runner.table, slots, positions, tokens)
        fb = runner.table.decode_batch(slots, positions, draft.kv_pool, draft.attn_backend, tokens)
        draft.attn_backend.prepare(fb)
        reference = grouped_logits(draft.model, fb, [[0], [1, 2, 3, 4], [5]])
        torch.testing.assert_close(batched, reference, atol=2e-4, rtol=2e-4)
        _release(engine, pages, slots)
