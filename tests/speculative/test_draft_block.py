"""Drafting a speculation block on one device: EasySpec's batched attention sublayers against the layers run
one by one, the block loop's drafts and exact draft KV against a sequential greedy reference, the block's
control message, and greedy outputs of the engine (standard and one-device EasySpec) against plain decoding.

The draft is the project's trained 6-layer model (models/mla-tiny-draft); references are its own layers
and plain EXTEND forwards over whole sequences, on fresh pages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from easyspec_reference import grouped_logits

from tpla_serve import Engine
from tpla_serve.config import EngineConfig
from tpla_serve.distributed import RunDraftBlock
from tpla_serve.distributed.control import decode_op, encode_op
from tpla_serve.engine.cuda_graph import StaticDecodeBatch
from tpla_serve.engine.request_table import RequestTable
from tpla_serve.forward_batch import BatchEntry, ForwardMode, TableDelta
from tpla_serve.speculative.draft import DraftModel
from tpla_serve.speculative.draft_loop import run_draft_block, step_positions
from tpla_serve.tpla.layout import ShardLayout

ROOT = Path(__file__).resolve().parents[2]
TARGET = str(ROOT / "models" / "mla-tiny")
DRAFT = str(ROOT / "models" / "mla-tiny-draft")
PROMPTS = [[31, 415, 9, 2048, 77, 600, 12, 5, 901, 1024, 33], [7, 64, 3000, 150, 8, 19, 1, 412, 36]]
NUM_PAGES = 64
MAX_PAGES = 8


def _draft(algorithm: str, group_size: int | None = None) -> DraftModel:
    config = EngineConfig(
        model_path=TARGET, dtype="float32", device="cpu", attention_backend="torch",
        speculative_algorithm=algorithm, speculative_draft_model_path=DRAFT, easyspec_group_size=group_size,
    )
    return DraftModel(config, 4096, NUM_PAGES, ShardLayout(), torch.device("cpu"))


def _table(pages: list[list[int]]) -> RequestTable:
    table = RequestTable(4, MAX_PAGES, torch.device("cpu"))
    for slot, p in enumerate(pages):
        table.set_pages(table.acquire(), 0, p)
    table.apply(table.take_delta())
    return table


def _pages(i: int) -> list[int]:
    return list(range(1 + i * MAX_PAGES, 1 + (i + 1) * MAX_PAGES))


def test_batched_attention_sublayers_equal_the_layers_one_by_one():
    """One decode step in groups [0], [1..4], [5]: every grouped layer's attention takes the group's
    input; batched, the step's logits and each layer's new KV equal the layers run one at a time."""
    draft = _draft("easyspec", 4)
    assert draft.groups == [[0], [1, 2, 3, 4], [5]] and list(draft.batched) == [1]
    prompt, pages = PROMPTS[0], _pages(0)
    draft.forward(ForwardMode.EXTEND, [BatchEntry(prompt, 0, pages)])
    table = _table([pages])
    slots, pos = np.array([0]), np.array([len(prompt)])
    token = torch.tensor([412])
    logits = draft.decode_from_table(table, slots, pos, token)
    ckv, kpe = (t.clone() for t in (draft.kv_pool.ckv_layers, draft.kv_pool.kpe_layers))

    fb = table.decode_batch(slots, pos, draft.kv_pool, draft.attn_backend, token)
    reference = grouped_logits(draft.model, fb, [[0], [1, 2, 3, 4], [5]])
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ckv, draft.kv_pool.ckv_layers, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kpe, draft.kv_pool.kpe_layers, atol=1e-5, rtol=1e-5)


def _greedy_reference(draft: DraftModel, prompt: list[int], k: int, pages: list[int]) -> list[int]:
    """k greedy draft tokens, each from an exact forward over the whole sequence so far."""
    seq = list(prompt)
    for _ in range(k):
        seq.append(int(draft.forward(ForwardMode.EXTEND, [BatchEntry(seq, 0, pages)]).argmax()))
    return seq[len(prompt):]


def _block(draft: DraftModel, num_drafts: list[int]) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill each prompt but its last token, then draft a block after it (calibration over that token)."""
    pages = [_pages(i) for i in range(len(num_drafts))]
    for prompt, p in zip(PROMPTS, pages):
        draft.forward(ForwardMode.EXTEND, [BatchEntry(prompt[:-1], 0, p)])
    op = RunDraftBlock(
        ForwardMode.DECODE,
        [BatchEntry(prompt[-1:], len(prompt) - 1, p) for prompt, p in zip(PROMPTS, pages)],
        np.arange(len(num_drafts), dtype=np.int64),
        np.array([len(p) for p in PROMPTS[: len(num_drafts)]], dtype=np.int64),
        np.array(num_drafts, dtype=np.int64),
        TableDelta.empty(),
    )
    tokens = run_draft_block(draft, _table(pages), op, lambda index, logits: logits.argmax(dim=-1))
    return tokens, pages


def test_block_drafts_equal_sequential_greedy_drafting_and_leave_exact_kv():
    """Standard drafting of two requests, 4 and 2 drafts: each row's drafts are its own greedy sequence (the
    shorter row parks after its drafts without disturbing the other), and the KV its draft steps wrote for
    d_1 .. d_{k-1} is the exact KV a prefill over prompt and drafts writes."""
    draft = _draft("standard")
    assert draft.exact_drafting
    tokens, pages = _block(draft, [4, 2])
    assert tokens.shape == (2, 4)
    fresh = [_pages(4), _pages(5)]
    for b, (k, p) in enumerate(zip([4, 2], fresh)):
        reference = _greedy_reference(draft, PROMPTS[b], k, p)
        assert tokens[b, :k].tolist() == reference
        n = len(PROMPTS[b])
        draft.forward(ForwardMode.EXTEND, [BatchEntry(PROMPTS[b] + reference[: k - 1], 0, p)])
        loc = torch.tensor([pages[b][t // 16] * 16 + t % 16 for t in range(n, n + k - 1)])
        ref_loc = torch.tensor([p[t // 16] * 16 + t % 16 for t in range(n, n + k - 1)])
        for layer in range(draft.config.num_hidden_layers):
            for got, want in zip(draft.kv_pool.read(layer, loc), draft.kv_pool.read(layer, ref_loc)):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_parked_rows_stay_inside_their_drafts():
    assert step_positions(np.array([10, 20]), np.array([4, 2]), 1).tolist() == [10, 20]
    assert step_positions(np.array([10, 20]), np.array([4, 2]), 2).tolist() == [11, 21]
    assert step_positions(np.array([10, 20]), np.array([4, 2]), 3).tolist() == [12, 21]


def test_draft_block_message_round_trips():
    op = RunDraftBlock(
        ForwardMode.DECODE,
        [BatchEntry([5, 6], 9, [1, 2]), BatchEntry([7], 3, [4])],
        np.array([0, 3], dtype=np.int64),
        np.array([11, 4], dtype=np.int64),
        np.array([4, 1], dtype=np.int64),
        TableDelta(np.array([8], dtype=np.int64), np.array([2], dtype=np.int32), np.zeros(0, np.int64),
                   np.zeros(0, np.int64)),
        local_argmax=True,
    )
    back = decode_op(encode_op(op))
    assert isinstance(back, RunDraftBlock) and back.mode is ForwardMode.DECODE and back.local_argmax
    entries = [(e.new_token_ids, e.prefix_len, e.pages) for e in back.calibration]
    assert entries == [([5, 6], 9, [1, 2]), ([7], 3, [4])]
    for name in ("slots", "positions", "num_drafts"):
        assert getattr(back, name).tolist() == getattr(op, name).tolist()
    assert back.delta.page_index.tolist() == [8] and back.delta.page_id.tolist() == [2]


PARAMS = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in (1, 4, 9, 23, 40)]
TEXTS = ["def fibonacci(n):", "The quick brown fox", "import numpy as np\n", "class Engine:\n", "for i in"]


@pytest.fixture(scope="module")
def plain_outputs() -> list[list[int]]:
    with Engine(model_path=TARGET, dtype="float32", device="cpu") as engine:
        return [o["output_ids"] for o in engine.generate(TEXTS, PARAMS)]


@pytest.mark.parametrize(
    "algorithm,group_size,k", [("standard", None, 2), ("easyspec", 2, 3), ("easyspec", 4, 5)]
)
def test_one_device_greedy_equals_plain_decoding(plain_outputs, algorithm, group_size, k):
    with Engine(
        model_path=TARGET, dtype="float32", device="cpu", speculative_algorithm=algorithm,
        speculative_draft_model_path=DRAFT, speculative_num_draft_tokens=k, easyspec_group_size=group_size,
    ) as engine:
        outs = engine.generate(TEXTS, PARAMS)
        alone = engine.generate(TEXTS[4], PARAMS[4])
        stats = engine.get_server_info()
    assert [o["output_ids"] for o in outs] == plain_outputs
    assert alone["output_ids"] == plain_outputs[4]
    assert stats["spec_accepted_drafts"] > 0


def test_graph_forward_over_static_buffers_equals_eager_steps():
    """What the draft's CUDA graphs capture, run eagerly over the static buffers (capture itself needs a GPU:
    test_spec_graphs_gpu.py): a decode step fed draft tokens from the device, in EasySpec's batched groups,
    with a padding row; and a calibration of k + 1 tokens per request, exact."""
    draft = _draft("easyspec", 4)
    config = EngineConfig(
        model_path=TARGET, dtype="float32", device="cpu", speculative_algorithm="easyspec",
        speculative_draft_model_path=DRAFT, easyspec_group_size=4, speculative_num_draft_tokens=3,
    )
    graphs = draft._capture_graphs(config, MAX_PAGES)
    assert graphs.disabled_reason is not None and not graphs.graphs  # no CUDA here
    pages = [_pages(0), _pages(1)]
    for prompt, p in zip(PROMPTS, pages):
        draft.forward(ForwardMode.EXTEND, [BatchEntry(prompt, 0, p)])
    table = _table(pages)
    slots = np.array([0, 1])
    positions = np.array([len(p) for p in PROMPTS[:2]])
    tokens = torch.tensor([412, 36])
    static = StaticDecodeBatch(4, MAX_PAGES, draft.kv_pool, draft.attn_backend, draft.device, max_q_len=4)
    eager = draft.decode_from_table(table, slots, positions, tokens)
    with torch.inference_mode():
        replayed = graphs.forward(static.load_from_table(table, slots, positions, 4, MAX_PAGES, tokens))
    torch.testing.assert_close(replayed[:2], eager, atol=1e-5, rtol=1e-5)

    entries = [BatchEntry(prompt[-4:], len(prompt) - 4, p) for prompt, p in zip(PROMPTS, pages)]
    eager = draft.forward_local(ForwardMode.DECODE, entries, exact=True)
    with torch.inference_mode():
        replayed = graphs.forward(static.load(entries, 4, MAX_PAGES, 4))
    torch.testing.assert_close(replayed[[3, 7]], eager, atol=1e-4, rtol=1e-4)
