"""Prefill and decode scheduler processes paired through bootstrap rooms, with the KV streamed over ZMQ.

The HTTP layer is left out here (tests/server and the router tests cover it); these drive the real
scheduler processes through their own ZMQ message protocol, as each server's front does.
"""

from __future__ import annotations

import random
import time

import pytest
from pd_helpers import Sched

from tpla_serve import Engine
from tpla_serve.config import EngineConfig
from tpla_serve.net import free_port
from tpla_serve.server.messages import GenerateRequest

PROMPT = [0] + [(7 * i) % 300 + 2 for i in range(40)]
PARAMS = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}


def engine_config(model_dir, **kw) -> EngineConfig:
    return EngineConfig(model_path=str(model_dir), dtype="float32", device="cpu", page_size=4,
                        max_total_tokens=1024, disaggregation_timeout=5.0, **kw)


@pytest.fixture(scope="module")
def pair(tiny_v3_dir):
    port = free_port()
    prefill = Sched(engine_config(tiny_v3_dir, disaggregation_mode="prefill", disaggregation_bootstrap_port=port))
    decode_ = Sched(engine_config(tiny_v3_dir, disaggregation_mode="decode", tp_size=2, tpla_groups=2,
                                  disaggregation_bootstrap_port=port))
    yield prefill, decode_
    decode_.stop()
    prefill.stop()


# Shares PROMPT's first 24 tokens (six pages): on the prefill server, a prefix cache hit.
SHARED_PROMPT = PROMPT[:24] + [(11 * i) % 300 + 2 for i in range(13)]


@pytest.fixture(scope="module")
def expected_both(tiny_v3_dir) -> tuple[list[int], list[int]]:
    with Engine(model_path=str(tiny_v3_dir), dtype="float32", device="cpu", page_size=4, tp_size=2,
                tpla_groups=2, max_total_tokens=1024, disable_radix_cache=True) as engine:
        outs = engine.generate(input_ids=[PROMPT, SHARED_PROMPT], sampling_params=PARAMS)
        return outs[0]["output_ids"], outs[1]["output_ids"]


@pytest.fixture(scope="module")
def expected(expected_both) -> list[int]:
    return expected_both[0]


@pytest.mark.parametrize("decode_first", [False, True])
def test_pd_pair_equals_in_process_tpla(pair, expected, decode_first):
    prefill, decode_ = pair
    baseline = decode_.stats()["pages_free"]
    room = random.getrandbits(63)
    body = GenerateRequest(f"pd-{decode_first}", PROMPT, PARAMS, bootstrap_host="127.0.0.1",
                           bootstrap_port=None, bootstrap_room=room)
    for server in (decode_, prefill) if decode_first else (prefill, decode_):
        server.send(body)
    first = prefill.final()
    assert first.output["output_ids"] == expected[:1]
    out = decode_.final()
    assert out.output["output_ids"] == expected
    assert out.output["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    stats = decode_.stats()
    assert stats["pages_free"] == baseline and stats["kv_transfer_bytes"] > 0


def test_room_without_prefill_times_out_and_frees_pages(pair):
    _, decode_ = pair
    baseline = decode_.stats()["pages_free"]
    body = GenerateRequest("lonely", PROMPT, PARAMS, bootstrap_host="127.0.0.1", bootstrap_port=None,
                           bootstrap_room=random.getrandbits(63))
    decode_.send(body)
    out = decode_.final(timeout_s=30)
    reason = out.output["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["message"]
    assert reason["status_code"] == 503 and reason["err_type"] == "kv_transfer_failed"  # retryable elsewhere
    assert decode_.stats()["pages_free"] == baseline


def test_fingerprint_mismatch_aborts_both_sides(tiny_v3_dir, pair):
    """A prefill whose latent is rotated differently must never feed this decode."""
    _, decode_ = pair
    port = free_port()
    other = Sched(engine_config(tiny_v3_dir, disaggregation_mode="prefill", disaggregation_bootstrap_port=port,
                                tpla_transform="hadamard"))
    try:
        baseline = decode_.stats()["pages_free"]
        body = GenerateRequest("mismatch", PROMPT, PARAMS, bootstrap_host="127.0.0.1", bootstrap_port=port,
                               bootstrap_room=random.getrandbits(63))
        decode_.send(body)
        other.send(body)
        out = decode_.final(timeout_s=30)
        reason = out.output["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "fingerprint" in reason["message"]
        assert decode_.stats()["pages_free"] == baseline
    finally:
        other.stop()


def test_prefill_that_dies_fails_the_room_and_frees_pages(tiny_v3_dir, pair):
    _, decode_ = pair
    port = free_port()
    doomed = Sched(engine_config(tiny_v3_dir, disaggregation_mode="prefill", disaggregation_bootstrap_port=port))
    baseline = decode_.stats()["pages_free"]
    body = GenerateRequest("orphan", PROMPT, PARAMS, bootstrap_host="127.0.0.1", bootstrap_port=port,
                           bootstrap_room=random.getrandbits(63))
    decode_.send(body)
    doomed.proc.kill()  # gone before it could send a single layer
    doomed.proc.join(30)
    doomed.ctx.destroy(0)
    reason = decode_.final(timeout_s=30).output["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["message"]
    assert decode_.stats()["pages_free"] == baseline


def test_prefill_keeps_serving_when_its_decode_is_gone(tiny_v3_dir, pair, expected):
    """A room nobody registers for ends on the prefill within the timeout; the next pair still works."""
    prefill, decode_ = pair
    lost = GenerateRequest("no-decode", PROMPT, PARAMS, bootstrap_host="127.0.0.1", bootstrap_port=None,
                           bootstrap_room=random.getrandbits(63))
    prefill.send(lost)
    assert prefill.final().output["output_ids"] == expected[:1]  # the prefill answers with its first token
    failed_before = prefill.stats()["kv_rooms_failed"]
    deadline = time.monotonic() + 30
    while prefill.stats()["kv_rooms_failed"] == failed_before:
        assert time.monotonic() < deadline, "the orphaned room never ended"
        time.sleep(0.5)
    test_pd_pair_equals_in_process_tpla(pair, expected, decode_first=True)


def test_prefill_cache_hit_streams_the_whole_prompt(pair, expected_both):
    """The prefill computes only what its cache lacks, yet the decode receives every row of the prompt and
    decodes exactly as from a prefill that computed it all."""
    prefill, decode_ = pair
    baseline = decode_.stats()["pages_free"]
    for rid, prompt, want in (("warm", PROMPT, expected_both[0]), ("hit", SHARED_PROMPT, expected_both[1])):
        body = GenerateRequest(rid, prompt, PARAMS, bootstrap_host="127.0.0.1", bootstrap_port=None,
                               bootstrap_room=random.getrandbits(63))
        prefill.send(body)
        decode_.send(body)
        first = prefill.final()
        out = decode_.final()
        assert out.output["output_ids"] == want
        if rid == "hit":
            assert first.output["meta_info"]["cached_tokens"] == 24
            assert out.output["meta_info"]["cached_tokens"] == 0  # the decode server computed nothing itself
    assert decode_.stats()["pages_free"] == baseline
    assert prefill.stats()["cached_prompt_tokens"] >= 24
