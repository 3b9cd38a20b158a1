"""Prefix caching is invisible in what a request returns: greedy tokens and logprobs (output and prompt) are
those of the same engine with the cache off, over random prefix-sharing workloads.

The workloads share system prompts of random lengths, continue earlier turns (prompt + answer + a new
message), and run in waves so later waves find earlier prompts cached. A pool far smaller than the
workload forces eviction and retraction; a chunked-prefill budget that is not a multiple of the page size
makes chunks end inside pages, cached and not.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tpla_serve import Engine
from tpla_serve.cache.radix_cache import RadixCache

ENGINE = {"dtype": "float32", "device": "cpu", "page_size": 4}
SHIPPED = Path(__file__).resolve().parents[2] / "models"


def _waves(vocab: int, seed: int) -> list[list[tuple[list[int], dict, int | None]]]:
    """Three waves of (prompt, sampling params, logprob_start_len or None); a wave's turns extend the
    previous wave's prompts."""
    rng = random.Random(seed)
    stems = [[rng.randrange(2, vocab) for _ in range(rng.randrange(5, 30))] for _ in range(3)]
    waves: list[list[tuple[list[int], dict, int | None]]] = []
    for w in range(3):
        wave = []
        for i in range(8):
            if w and i % 3 == 0:  # a later turn of an earlier conversation
                base = waves[-1][i][0]
            else:
                stem = rng.choice(stems)
                base = stem[: rng.randrange(len(stem) // 2, len(stem) + 1)]
            prompt = base + [rng.randrange(2, vocab) for _ in range(rng.randrange(1, 10))]
            params = {"max_new_tokens": rng.randrange(1, 12), "temperature": 0, "ignore_eos": True}
            start = rng.randrange(len(prompt)) if i % 4 == 1 else None  # prompt logprobs from here
            wave.append((prompt, params, start))
        waves.append(wave)
    return waves


def _run(engine: Engine, waves: list) -> list[dict]:
    outs = []
    for wave in waves:
        prompts, params, starts = zip(*wave)
        outs += engine.generate(
            input_ids=list(prompts), sampling_params=list(params), return_logprob=True,
            logprob_start_len=[-1 if s is None else s for s in starts], top_logprobs_num=2,
        )
    return outs


def _logprobs(out: dict, key: str) -> torch.Tensor:
    return torch.tensor([x[0] for x in out["meta_info"][key] if x[0] is not None], dtype=torch.float64)


class _Evictions:
    """Counts pages the real RadixCache.evict gives back (wraps the engine's own cache)."""

    def __init__(self, cache: RadixCache) -> None:
        self.pages = 0
        evict = cache.evict

        def counted(num_pages: int) -> int:
            freed = evict(num_pages)
            self.pages += freed
            return freed

        cache.evict = counted  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "seed, pool, chunk",
    [(0, 4096, 512), (1, 160, 7), (2, 96, 10)],
    ids=["roomy", "evicting-chunk7", "retracting-chunk10"],
)
def test_outputs_and_logprobs_equal_the_uncached_engine(tiny_v3_dir, seed, pool, chunk):
    common = {**ENGINE, "max_total_tokens": pool, "chunked_prefill_size": chunk}
    with Engine(model_path=str(tiny_v3_dir), disable_radix_cache=True, **common) as plain:
        assert plain.scheduler.cache is None
        waves = _waves(plain.runner.model_config.vocab_size, seed)
        want = _run(plain, waves)
    with Engine(model_path=str(tiny_v3_dir), **common) as cached:
        evictions = _Evictions(cached.scheduler.cache)
        got = _run(cached, waves)
        stats = cached.scheduler.stats()
        assert cached.scheduler.stats().pages_used == 0
        assert cached.flush_cache()
        assert cached.scheduler.allocator.num_free == cached.scheduler.allocator.num_usable
    for g, w in zip(got, want):
        assert g["output_ids"] == w["output_ids"]
        torch.testing.assert_close(_logprobs(g, "output_token_logprobs"), _logprobs(w, "output_token_logprobs"),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(_logprobs(g, "input_token_logprobs"), _logprobs(w, "input_token_logprobs"),
                                   atol=1e-4, rtol=0)
        assert w["meta_info"]["cached_tokens"] == 0
    cached_tokens = [g["meta_info"]["cached_tokens"] for g in got]
    assert all(c % 4 == 0 for c in cached_tokens) and sum(cached_tokens) > 0
    assert stats.cached_prompt_tokens == sum(cached_tokens) or stats.num_retractions > 0
    assert 0 < stats.cache_hit_rate < 1
    if pool < 4096:
        assert evictions.pages > 0, "the pool was meant to run short"
    if pool < 100:
        assert stats.num_retractions > 0, "the pool was meant to retract requests"


def test_cache_hit_skips_the_prefix_and_leaves_the_last_page_to_compute(engine_v3):
    """A prompt wholly cached still computes its last token (its logits give the first output token), and
    prompt logprobs from position s are never taken from the cache for positions at or after s."""
    engine_v3.flush_cache()
    prompt = list(range(2, 26))  # 24 tokens: six whole pages
    first = engine_v3.generate(input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0})
    again = engine_v3.generate(input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert first["meta_info"]["cached_tokens"] == 0
    assert again["meta_info"]["cached_tokens"] == 20  # five pages; the sixth holds the token to compute
    assert again["output_ids"] == first["output_ids"]
    scored = engine_v3.generate(input_ids=prompt, sampling_params={"max_new_tokens": 1, "temperature": 0},
                                return_logprob=True, logprob_start_len=10)
    assert scored["meta_info"]["cached_tokens"] == 8  # pages below position 10 only
    assert len(scored["meta_info"]["input_token_logprobs"]) == len(prompt) - 10


def test_flush_is_refused_while_requests_run(engine_v3):
    sched = engine_v3.scheduler
    reqs, _ = engine_v3.add_requests(input_ids=[list(range(2, 40))], sampling_params={"max_new_tokens": 8})
    sched.step()
    ok, message = sched.flush_cache()
    assert not ok and "running" in message
    while sched.has_work:
        sched.step()
    sched.pop_finished(reqs[0].rid)
    assert sched.cache.num_pages > 0
    ok, message = sched.flush_cache()
    assert ok and sched.cache.num_pages == 0 and sched.allocator.num_free == sched.allocator.num_usable


def test_abort_of_a_request_reading_a_cached_prefix_keeps_the_prefix(engine_v3):
    sched = engine_v3.scheduler
    engine_v3.flush_cache()
    prompt = list(range(2, 42))
    engine_v3.generate(input_ids=prompt, sampling_params={"max_new_tokens": 1})
    cached = sched.cache.num_pages
    reqs, _ = engine_v3.add_requests(input_ids=[prompt + [5, 6, 7]], sampling_params={"max_new_tokens": 50})
    sched.step()
    assert reqs[0].cached_tokens == 40 and sched.cache.evictable_pages < cached  # locked while it runs
    engine_v3.abort(reqs[0].rid)
    while sched.has_work:
        sched.step()
    sched.pop_finished(reqs[0].rid)
    assert sched.cache.num_pages >= cached and sched.cache.evictable_pages == sched.cache.num_pages
    assert sched.stats().pages_used == 0


def test_speculative_engine_reads_the_drafts_cached_prefix_too():
    """The draft model's KV lives in its own pool under the same page ids: a cached prefix is exact for
    both models, so speculation from a cached prefix proposes and accepts exactly as from a computed one."""
    args = {"model_path": str(SHIPPED / "mla-tiny"), "dtype": "float32", "device": "cpu",
            "speculative_algorithm": "standard", "speculative_draft_model_path": str(SHIPPED / "mla-tiny-draft")}
    system = "You are a helpful assistant. Answer briefly and in plain words.\n"
    prompts = [system + q for q in ("def add(a, b):", "Name three colors:", "def fib(n):", "import os\n")]
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    runs = {}
    for disable in (True, False):
        with Engine(**args, disable_radix_cache=disable) as engine:
            engine.generate(prompts[0], params)  # caches the system prompt (when the cache is on)
            outs = engine.generate(prompts[1:], params)
            runs[disable] = [(o["output_ids"], o["meta_info"]["spec_accept_length"]) for o in outs]
            cached = [o["meta_info"]["cached_tokens"] for o in outs]
            assert all(c > 0 for c in cached) != disable
    assert runs[False] == runs[True]


def test_requests_arriving_together_compute_their_shared_prefix_once(engine_v3):
    """The first computes the shared 64 tokens; the others wait for them instead of computing them too."""
    engine_v3.flush_cache()
    shared = [(5 * i) % 200 + 2 for i in range(64)]
    prompts = [shared + [i + 2, i + 3, i + 4] for i in range(4)]
    params = {"max_new_tokens": 3, "temperature": 0}
    outs = engine_v3.generate(input_ids=prompts, sampling_params=params)
    assert [o["meta_info"]["cached_tokens"] for o in outs] == [0, 64, 64, 64]
    engine_v3.flush_cache()
    alone = [engine_v3.generate(input_ids=p, sampling_params=params)["output_ids"] for p in prompts[1:]]
    assert [o["output_ids"] for o in outs[1:]] == alone
