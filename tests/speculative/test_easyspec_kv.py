"""Layer-parallel drafting leaves only "fuzzy" draft KV behind, and bonus calibration makes it exact again.

Rank 0 of a T = 2 EasySpec runner (draft layers grouped [0], [1, 2], [3, 4], [5]) drafts three tokens
after a prompt; its draft pool is compared with a fresh sequential forward of the draft model over prompt
and drafts in one process. Layers 0 and 1 see exact inputs, so their KV is exact; layer 2's attention ran
on rank 1, so rank 0 holds nothing for it; layers 3-5 consumed the group's approximate output. One
calibration forward over the drafted tokens then restores every layer's KV and the exact next logits,
on rank 1 too (the next layer-parallel step reads it there).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tpla_serve.config import EngineConfig
from tpla_serve.entrypoints.rank import RankParts, launch_rank0
from tpla_serve.forward_batch import BatchEntry, ForwardMode
from tpla_serve.speculative.draft import DraftModel, layer_groups
from tpla_serve.tpla.layout import ShardLayout

ROOT = Path(__file__).resolve().parents[2]
TARGET = str(ROOT / "models" / "mla-tiny")
DRAFT = str(ROOT / "models" / "mla-tiny-draft")
PROMPT = [31, 415, 9, 2048, 77, 600, 12, 5, 901, 1024, 33, 7, 64, 3000, 150, 8, 19, 1]
DRAFTED = [412, 36, 2077]


def test_layer_groups():
    assert layer_groups(6, 2) == [[0], [1, 2], [3, 4], [5]]
    assert layer_groups(6, 4) == [[0], [1, 2, 3, 4], [5]]
    assert layer_groups(7, 2) == [[0], [1, 2], [3, 4], [5], [6]]
    assert layer_groups(6, 1) == [[i] for i in range(6)]
    assert layer_groups(2, 2) == [[0], [1]]
    with pytest.raises(ValueError):
        layer_groups(6, 0)


@pytest.fixture(scope="module")
def rank():
    config = EngineConfig(
        model_path=TARGET,
        dtype="float32",
        device="cpu",
        tp_size=2,
        kv_cache_bytes=1 << 24,
        speculative_algorithm="easyspec",
        speculative_draft_model_path=DRAFT,
    )
    rank = launch_rank0(config)
    yield rank
    rank.close()


def _reference(rank: RankParts, pages: list[int]) -> tuple[DraftModel, torch.Tensor]:
    """A single-process draft model, run sequentially over prompt + drafts from scratch."""
    config = EngineConfig(
        model_path=TARGET, dtype="float32", device="cpu", page_size=rank.runner.page_size,
        attention_backend="torch", speculative_algorithm="standard", speculative_draft_model_path=DRAFT,
    )
    ref = DraftModel(config, rank.runner.model_config.vocab_size, rank.runner.allocator.num_pages, ShardLayout(),
                     torch.device("cpu"))
    logits = ref.forward(ForwardMode.EXTEND, [BatchEntry(PROMPT + DRAFTED, 0, pages)])
    return ref, logits


def test_calibration_restores_exact_draft_kv(rank):
    runner, draft = rank.runner, rank.draft
    assert draft is not None and draft.groups == [[0], [1, 2], [3, 4], [5]]
    pages = runner.allocator.alloc(2)
    n, total = len(PROMPT), len(PROMPT) + len(DRAFTED)
    draft.forward(ForwardMode.EXTEND, [BatchEntry(PROMPT, 0, pages)])
    for j, tok in enumerate(DRAFTED):  # layer-parallel draft steps, one token each
        draft.forward(ForwardMode.DECODE, [BatchEntry([tok], n + j, pages)])

    ref, ref_logits = _reference(rank, pages)
    slots = torch.tensor([pages[t // runner.page_size] * runner.page_size + t % runner.page_size
                          for t in range(n, total)])
    pool = draft.kv_pool

    def gap(layer: int) -> float:
        ckv, kpe = pool.read(layer, slots)
        ref_ckv, ref_kpe = ref.kv_pool.read(layer, slots)
        return max((ckv - ref_ckv).abs().max().item(), (kpe - ref_kpe).abs().max().item())

    assert gap(0) < 1e-5 and gap(1) < 1e-5  # exact inputs
    assert pool.read(2, slots)[0].abs().max().item() == 0.0  # computed on rank 1, not here
    assert min(gap(3), gap(4), gap(5)) > 1e-3  # fuzzy

    logits = draft.forward(ForwardMode.EXTEND, [BatchEntry(DRAFTED, n, pages)])  # bonus calibration
    for layer in range(6):
        assert gap(layer) < 1e-5, f"layer {layer}"
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)

    # Rank 1's pool cannot be read from here, but the next layer-parallel step reads it (layer 2's
    # attention runs there): it must match the same step after an exact prefill of every rank's pool.
    fresh = runner.allocator.alloc(2)
    draft.forward(ForwardMode.EXTEND, [BatchEntry(PROMPT + DRAFTED, 0, fresh)])
    nxt = int(logits.argmax())
    after_calibration = draft.forward(ForwardMode.DECODE, [BatchEntry([nxt], total, pages)])
    after_exact_prefill = draft.forward(ForwardMode.DECODE, [BatchEntry([nxt], total, fresh)])
    torch.testing.assert_close(after_calibration, after_exact_prefill, atol=1e-5, rtol=1e-5)
    runner.allocator.free(pages + fresh)
