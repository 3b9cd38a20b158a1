"""A prefill that also prefills the draft model, feeding speculative decode servers (T = 2, g = 2).

Real scheduler processes and sockets: the decode's draft starts from the draft KV the prefill streamed
with the target's. Greedy outputs must equal the in-process engine's, speculative and plain alike, in
both arrival orders; a prefill without the draft still serves a speculative decode (the draft then
prefills on the decode). The trained target and draft (models/mla-tiny, models/mla-tiny-draft) share a
vocabulary, so drafts are really accepted.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from pd_helpers import Sched

from tpla_serve import Engine
from tpla_serve.config import EngineConfig
from tpla_serve.models.config import ModelConfig
from tpla_serve.net import free_port
from tpla_serve.server.messages import GenerateRequest

ROOT = Path(__file__).resolve().parents[2]
TARGET = str(ROOT / "models" / "mla-tiny")
DRAFT = str(ROOT / "models" / "mla-tiny-draft")
PROMPTS = ["def fibonacci(n):", "The quick brown fox jumps over the lazy dog. The quick brown"]
PARAMS = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
COMMON = {"model_path": TARGET, "dtype": "float32", "device": "cpu", "page_size": 4, "max_total_tokens": 1024}
SPEC = {"speculative_draft_model_path": DRAFT, "speculative_num_draft_tokens": 3}
DECODE = {"disaggregation_mode": "decode", "tp_size": 2, "tpla_groups": 2, "disaggregation_timeout": 20.0}


def _draft_bytes_per_token() -> int:
    """float32 ĉ + k_pe of every draft layer: what one decode rank with a draft pool receives per token."""
    cfg = ModelConfig.from_pretrained_dir(Path(DRAFT))
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict]:
    """Two prefills (with and without the draft), an easyspec and a standard decode, and the in-process
    engine's answers (computed while the servers start; one process holds one TP group at a time)."""
    port, plain_port = free_port(), free_port()
    servers: dict[str, Sched] = {}
    try:
        prefill = {"disaggregation_mode": "prefill"}
        for name, kw in (
            ("prefill", {**prefill, "disaggregation_bootstrap_port": port, "speculative_draft_model_path": DRAFT}),
            ("prefill_no_draft", {**prefill, "disaggregation_bootstrap_port": plain_port}),
            ("easyspec", {**DECODE, **SPEC, "speculative_algorithm": "easyspec", "disaggregation_bootstrap_port": port}),
            ("standard", {**DECODE, **SPEC, "speculative_algorithm": "standard", "disaggregation_bootstrap_port": port}),
        ):
            servers[name] = Sched(EngineConfig(**COMMON, **kw), wait=False)
        tp = {**COMMON, "tp_size": 2, "tpla_groups": 2}
        with Engine(**tp) as engine:
            ids = [engine.tokenizer.encode(p) for p in PROMPTS]
            plain = [o["output_ids"] for o in engine.generate(input_ids=ids, sampling_params=PARAMS)]
        with Engine(**tp, speculative_algorithm="easyspec", **SPEC) as engine:
            spec = [o["output_ids"] for o in engine.generate(input_ids=ids, sampling_params=PARAMS)]
        assert spec == plain
        for server in servers.values():
            server.wait_ready()
        yield {"ids": ids, "expected": plain, "plain_port": plain_port, **servers}
    finally:
        for server in servers.values():
            server.stop()


def _run(cluster: dict, decode_name: str, prefill_name: str, decode_first: bool) -> tuple[list[dict], dict, dict]:
    """Every prompt through the pair; (decode outputs in prompt order, decode stats, prefill stats) deltas."""
    decode_, prefill = cluster[decode_name], cluster[prefill_name]
    port = cluster["plain_port"] if prefill_name == "prefill_no_draft" else None
    before_d, before_p = decode_.stats(), prefill.stats()
    rids = [f"{decode_name}-{prefill_name}-{decode_first}-{i}" for i in range(len(cluster["ids"]))]
    for rid, ids in zip(rids, cluster["ids"]):
        body = GenerateRequest(rid, ids, PARAMS, bootstrap_host="127.0.0.1", bootstrap_port=port,
                               bootstrap_room=random.getrandbits(63))
        for server in (decode_, prefill) if decode_first else (prefill, decode_):
            server.send(body)
    for _ in rids:
        prefill.final()
    outputs = {}
    while len(outputs) < len(rids):
        out = decode_.final()
        outputs[out.rid] = out.output
    after_d, after_p = decode_.stats(), prefill.stats()
    assert after_d["pages_free"] == before_d["pages_free"]
    keys = ("kv_transfer_bytes", "kv_transfer_draft_bytes")
    return (
        [outputs[r] for r in rids],
        {k: after_d[k] - before_d[k] for k in keys},
        {k: after_p[k] - before_p[k] for k in keys},
    )


@pytest.mark.parametrize(
    "algorithm, draft_ranks, decode_first",
    [("easyspec", 2, False), ("easyspec", 2, True), ("standard", 1, True)],
    ids=["easyspec-prefill-first", "easyspec-decode-first", "standard-decode-first"],
)
def test_decode_starts_from_the_prefills_draft_kv(cluster, algorithm: str, draft_ranks: int, decode_first: bool):
    outputs, decode_stats, prefill_stats = _run(cluster, algorithm, "prefill", decode_first)
    assert [o["output_ids"] for o in outputs] == cluster["expected"]
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in outputs)
    # Rank 0's draft bytes reach the decode's stats; the prefill sent them to every rank with a draft.
    draft_bytes = sum(len(ids) for ids in cluster["ids"]) * _draft_bytes_per_token()
    assert decode_stats["kv_transfer_draft_bytes"] == draft_bytes
    assert decode_stats["kv_transfer_bytes"] > draft_bytes
    assert prefill_stats["kv_transfer_draft_bytes"] == draft_bytes * draft_ranks


def test_prefill_without_the_draft_still_serves_a_speculative_decode(cluster):
    outputs, decode_stats, prefill_stats = _run(cluster, "easyspec", "prefill_no_draft", decode_first=True)
    assert [o["output_ids"] for o in outputs] == cluster["expected"]
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in outputs)
    assert decode_stats["kv_transfer_draft_bytes"] == 0 and decode_stats["kv_transfer_bytes"] > 0
    assert prefill_stats["kv_transfer_draft_bytes"] == 0
