"""The draft KV a prefill streams is the draft KV the decode's own draft prefill would have written.

In one process (T = 1 on both sides, so nothing but the KV path differs): a prefill runner with the draft
model streams a prompt, in two chunks, to a speculative decode runner over loopback ZMQ. The decode's
draft pool rows for the prompt must equal, bit for bit, what its own draft EXTEND writes over the same
chunks, and the request, started with draft_computed = prompt length, decodes exactly as a request the
decode server prefilled itself: same tokens, same drafts accepted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tpla_serve.config import EngineConfig
from tpla_serve.disagg import KVSender, RoomCompleted
from tpla_serve.disagg.prefill_side import PromptKVStream
from tpla_serve.engine.request import RequestSpec
from tpla_serve.entrypoints.rank import RankParts, build_scheduler, launch_rank0
from tpla_serve.forward_batch import BatchEntry, ForwardMode
from tpla_serve.sampling.params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
TARGET = str(ROOT / "models" / "mla-tiny")
DRAFT = str(ROOT / "models" / "mla-tiny-draft")
PROMPT = [0] + [(37 * i) % 3000 + 5 for i in range(29)]
CHUNK = 17  # the prompt's two prefill chunks: [0, 17) and [17, 30)
PAGE = 4


def _config(**kw: object) -> EngineConfig:
    return EngineConfig(model_path=TARGET, dtype="float32", device="cpu", page_size=PAGE, max_total_tokens=512,
                        skip_tokenizer_init=True, disaggregation_timeout=10.0, **kw)


@pytest.fixture(scope="module")
def runners() -> Iterator[tuple[RankParts, KVSender, PromptKVStream, RankParts]]:
    prefill = launch_rank0(_config(disaggregation_mode="prefill", speculative_draft_model_path=DRAFT))
    sender = KVSender(prefill.kv_spec(), draft=prefill.draft_kv_spec())
    stream = PromptKVStream(prefill.runner, sender, prefill.draft)
    decode = launch_rank0(_config(disaggregation_mode="decode", speculative_algorithm="standard",
                                  speculative_draft_model_path=DRAFT, disaggregation_bootstrap_port=sender.bootstrap_port))
    yield prefill, sender, stream, decode
    decode.close()
    sender.close()
    prefill.close()


def _chunks(pages: list[int], room: int | None = None) -> list[BatchEntry]:
    return [BatchEntry(PROMPT[:CHUNK], 0, pages, False, room), BatchEntry(PROMPT[CHUNK:], CHUNK, pages, False, room)]


def _slots(pages: list[int], n: int) -> torch.Tensor:
    return torch.tensor([p * PAGE + o for p in pages for o in range(PAGE)])[:n]


def _completed(decode: RankParts, room: int) -> RoomCompleted:
    assert decode.kv_port is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for event in decode.kv_port.poll():
            assert isinstance(event, RoomCompleted) and event.room == room, event
            return event
        time.sleep(0.005)
    raise AssertionError("the room did not complete")


def test_streamed_draft_kv_equals_the_decodes_own_draft_prefill(runners) -> None:
    prefill, sender, stream, decode = runners
    assert not prefill.config.speculative and prefill.draft is not None  # a prefill does not speculate
    assert decode.draft is not None and decode.kv_port is not None
    sched = build_scheduler(decode, None, None)
    n, room = len(PROMPT), 12345
    pages = sched.allocator.alloc(-(-n // PAGE))
    decode.kv_port.expect(room, n, pages, "127.0.0.1", None)
    decode.kv_port.receiver.send_register(room, decode.kv_endpoints)
    deadline = time.monotonic() + 10
    while sender.stats().rooms_registered == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sender.stats().rooms_registered == 1

    prefill_pages = prefill.runner.allocator.alloc(-(-n // PAGE))
    for entry in _chunks(prefill_pages, room):  # the prefill's scheduler runs one chunk per step
        logits = stream.forward([entry])
    first = int(logits[-1].argmax())
    sender.send_done(room, first)
    event = _completed(decode, room)
    assert event.draft_kv and decode.kv_port.has_draft(event)
    draft_cfg = decode.draft.config
    assert event.draft_nbytes == n * draft_cfg.num_hidden_layers * (draft_cfg.kv_lora_rank + draft_cfg.qk_rope_head_dim) * 4

    # The decode's own draft prefill over the same chunks, into other pages.
    ref_pages = sched.allocator.alloc(-(-n // PAGE))
    for entry in _chunks(ref_pages):
        decode.draft.forward(ForwardMode.EXTEND, [entry])
    pool = decode.draft.kv_pool
    for layer in range(pool.num_layers):
        got, want = pool.read(layer, _slots(pages, n)), pool.read(layer, _slots(ref_pages, n))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), layer
        assert got[0].abs().sum() > 0
    sched.allocator.free(ref_pages)

    # Started from the streamed KV, the request speculates exactly as one the decode prefilled itself.
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    req = sched.new_request(RequestSpec(PROMPT, params, rid="pd"))
    sched.add_prefilled(req, pages, first, draft_kv=True)
    assert req.draft_computed == n
    local = sched.add_request(RequestSpec(PROMPT, params, rid="local"))
    while sched.has_work:
        sched.step()
    assert req.output_ids == local.output_ids and req.output_ids[0] == first
    assert req.spec_verify_ct > 0
    assert (req.spec_num_proposed_drafts, req.spec_num_correct_drafts) == (
        local.spec_num_proposed_drafts,
        local.spec_num_correct_drafts,
    )
    assert sched.stats().pages_used == 0


def test_without_draft_kv_the_request_prefills_its_draft_on_the_decode(runners) -> None:
    *_, decode = runners
    sched = build_scheduler(decode, None, None)
    pages = sched.allocator.alloc(-(-len(PROMPT) // PAGE))
    req = sched.new_request(RequestSpec(PROMPT, SamplingParams(temperature=0, max_new_tokens=2), rid="x"))
    sched.add_prefilled(req, pages, 7, draft_kv=False)
    assert req.draft_computed == 0
    sched.abort("x")
    assert sched.stats().pages_used == 0


def test_a_cached_prefix_streams_bit_for_bit_as_a_computed_one(runners) -> None:
    """A prefill whose prompt starts with cached pages streams those pages' rows (read from its pools)
    and then the rows it computes over them: the decode holds, target and draft, exactly what a prefill of
    the whole prompt over the same chunks sends."""
    prefill, sender, stream, decode = runners
    assert decode.kv_port is not None and decode.draft is not None
    sched = build_scheduler(decode, None, None)
    shared = 16  # four pages of PROMPT
    other = PROMPT[:shared] + [(11 * i) % 3000 + 5 for i in range(9)]
    n = len(other)
    allocator = prefill.runner.allocator
    earlier = allocator.alloc(-(-len(PROMPT) // PAGE))  # an earlier request computed PROMPT's pages
    stream.forward([BatchEntry(PROMPT[:shared], 0, earlier)])
    stream.forward([BatchEntry(PROMPT[shared:], shared, earlier)])

    rooms = {"cached": 2001, "computed": 2002}
    decode_pages = {}
    for name, room in rooms.items():
        decode_pages[name] = sched.allocator.alloc(-(-n // PAGE))
        decode.kv_port.expect(room, n, decode_pages[name], "127.0.0.1", None)
        decode.kv_port.receiver.send_register(room, decode.kv_endpoints)
    deadline = time.monotonic() + 10
    while sender.stats().rooms_registered < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sender.stats().rooms_registered == 2

    hit = earlier[: shared // PAGE] + allocator.alloc(-(-n // PAGE) - shared // PAGE)
    stream.forward([BatchEntry(other[shared:], shared, hit, False, rooms["cached"], kv_start=0)])
    computed = allocator.alloc(-(-n // PAGE))
    stream.forward([BatchEntry(other[:shared], 0, computed, False, rooms["computed"])])
    stream.forward([BatchEntry(other[shared:], shared, computed, False, rooms["computed"])])
    for room in rooms.values():
        sender.send_done(room, 7)
    done: set[int] = set()
    deadline = time.monotonic() + 10
    while len(done) < 2 and time.monotonic() < deadline:
        for event in decode.kv_port.poll():
            assert isinstance(event, RoomCompleted) and event.draft_kv, event
            done.add(event.room)
        time.sleep(0.005)
    assert done == set(rooms.values())
    for pool in (decode.runner.kv_pool, decode.draft.kv_pool):
        for layer in range(pool.num_layers):
            got = pool.read(layer, _slots(decode_pages["cached"], n))
            want = pool.read(layer, _slots(decode_pages["computed"], n))
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), layer
            assert got[0][:shared].abs().sum() > 0 and got[0][shared:].abs().sum() > 0
    allocator.free(earlier + hit[shared // PAGE :] + computed)
    for pages in decode_pages.values():
        sched.allocator.free(pages)
    assert sched.stats().pages_used == 0
