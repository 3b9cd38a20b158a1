"""Policies, prefix tree, circuit breaker and worker health state, in-process."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
from tpla_router.circuit_breaker import BreakerState, CircuitBreaker
from tpla_router.config import Role, RouterConfig, WorkerSpec
from tpla_router.policies import (
    CacheAwarePolicy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    make_policy,
)
from tpla_router.policies.prefix_tree import PrefixTree
from tpla_router.worker import Worker, WorkerPool


@dataclass
class FakeWorker:
    url: str
    in_flight: int = 0


def workers(n: int) -> list[FakeWorker]:
    return [FakeWorker(f"http://w{i}") for i in range(n)]


def test_round_robin_cycles_evenly() -> None:
    ws = workers(3)
    policy = RoundRobinPolicy()
    picks = [policy.select(ws, None).url for _ in range(30)]
    assert picks[:3] == [w.url for w in ws]
    assert Counter(picks) == {w.url: 10 for w in ws}


def test_random_covers_workers_uniformly() -> None:
    ws = workers(4)
    policy = RandomPolicy(random.Random(0))
    counts = Counter(policy.select(ws, "x").url for _ in range(4000))
    assert set(counts) == {w.url for w in ws}
    assert all(800 < c < 1200 for c in counts.values()), counts


def test_power_of_two_never_picks_the_busiest_and_prefers_the_idlest() -> None:
    ws = workers(3)
    for w, load in zip(ws, (0, 5, 10)):
        w.in_flight = load
    policy = PowerOfTwoPolicy(random.Random(0))
    counts = Counter(policy.select(ws, None).url for _ in range(3000))
    assert counts["http://w2"] == 0
    # Exactly: the idlest wins whenever it is sampled (2 of 3 pairs).
    assert 1800 < counts["http://w0"] < 2200, counts


def test_power_of_two_single_worker() -> None:
    ws = workers(1)
    assert PowerOfTwoPolicy().select(ws, None) is ws[0]


def cache_policy(**kw: float) -> CacheAwarePolicy:
    args = {"cache_threshold": 0.5, "balance_abs_threshold": 4, "balance_rel_threshold": 1.5,
            "max_tree_size": 1 << 20}
    args.update(kw)
    return CacheAwarePolicy(**args)  # type: ignore[arg-type]


def test_cache_aware_prefix_affinity_and_spread() -> None:
    ws = workers(3)
    policy = cache_policy()
    systems = [f"system prompt number {i} " * 8 for i in range(3)]
    home = {s: policy.select(ws, s + "first question").url for s in systems}
    # New prefixes go to the worker with the least cached text, so three systems land on three workers.
    assert len(set(home.values())) == 3
    rng = random.Random(1)
    for _ in range(60):
        s = rng.choice(systems)
        assert policy.select(ws, s + f"follow-up {rng.random()}").url == home[s]


def test_cache_aware_falls_back_to_least_load_when_imbalanced() -> None:
    ws = workers(2)
    policy = cache_policy(balance_abs_threshold=4, balance_rel_threshold=1.5)
    shared = "a shared long prefix " * 10
    home = policy.select(ws, shared + "home branch " * 3)
    other = next(w for w in ws if w is not home)
    home.in_flight, other.in_flight = 10, 2  # 10 - 2 > 4 and 10 > 2 * 1.5
    assert policy.select(ws, shared + "other branch " * 3) is other
    home.in_flight, other.in_flight = 5, 2  # 5 - 2 <= 4: balanced enough, affinity again
    assert policy.select(ws, shared + "home branch " * 3 + "next") is home
    assert policy.select(ws, shared + "other branch " * 3 + "next") is other


def test_cache_aware_ignores_unavailable_and_removed_workers() -> None:
    ws = workers(2)
    policy = cache_policy()
    key = "prefix that belongs to one worker " * 4
    home = policy.select(ws, key)
    other = next(w for w in ws if w is not home)
    assert policy.select([other], key) is other  # home is not a candidate
    policy.on_worker_removed(home.url)
    policy.on_worker_removed(other.url)
    # After both forget, the key is new again: the first worker with the least cached text wins.
    assert policy.select(ws, key) is ws[0]


def test_make_policy_builds_each_name() -> None:
    config = RouterConfig()
    for name, cls in [("round_robin", RoundRobinPolicy), ("random", RandomPolicy),
                      ("power_of_two", PowerOfTwoPolicy), ("cache_aware", CacheAwarePolicy)]:
        assert isinstance(make_policy(name, config), cls)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("least_loaded", config)


def _lcp(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_prefix_tree_matches_brute_force() -> None:
    rng = random.Random(7)
    tree = PrefixTree()
    inserted: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    for _ in range(300):
        tenant = rng.choice("abc")
        text = "".join(rng.choice("xyz") for _ in range(rng.randint(1, 12)))
        tree.insert(text, tenant)
        inserted[tenant].append(text)
        query = "".join(rng.choice("xyz") for _ in range(rng.randint(1, 14)))
        allowed = set(rng.sample("abc", rng.randint(1, 3)))
        best = max((_lcp(query, t) for tn in allowed for t in inserted[tn]), default=0)
        matched, tenant_hit = tree.prefix_match(query, allowed)
        assert matched == best
        if best:
            assert tenant_hit in allowed
            assert any(_lcp(query, t) == best for t in inserted[tenant_hit])
    for tenant, texts in inserted.items():
        distinct_chars = len(_trie_chars(texts))
        assert tree.tenant_size(tenant) == distinct_chars


def _trie_chars(texts: list[str]) -> set[str]:
    """Every distinct non-empty prefix: the characters a trie of `texts` holds."""
    return {t[:k] for t in texts for k in range(1, len(t) + 1)}


def test_prefix_tree_evicts_least_recently_used_first() -> None:
    tree = PrefixTree()
    old = ["old-" + c * 20 for c in "abc"]
    new = ["new-" + c * 20 for c in "def"]
    for text in old + new:
        tree.insert(text, "t")
    tree.insert(old[0], "t")  # touch: now among the most recent
    budget = len(_trie_chars([old[0]] + new))
    tree.evict(budget)
    assert tree.tenant_size("t") <= budget
    for text in [old[0]] + new:
        assert tree.prefix_match(text, {"t"}) == (len(text), "t")
    for text in old[1:]:
        assert tree.prefix_match(text, {"t"})[0] < len(text)


def test_prefix_tree_remove_tenant_keeps_others() -> None:
    tree = PrefixTree()
    tree.insert("shared prefix one", "a")
    tree.insert("shared prefix two", "b")
    tree.remove_tenant("a")
    assert tree.tenant_size("a") == 0
    assert tree.prefix_match("shared prefix one", {"a", "b"}) == (len("shared prefix "), "b")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(failure_threshold=3, success_threshold=2, timeout_secs=10, clock=clock)
    cb.record_failure()
    cb.record_failure()
    cb.record_success()  # resets the consecutive count
    cb.record_failure()
    cb.record_failure()
    assert cb.state is BreakerState.CLOSED and cb.allows()
    cb.record_failure()
    assert cb.state is BreakerState.OPEN and not cb.allows()
    clock.now += 9.9
    assert not cb.allows()
    clock.now += 0.2
    assert cb.state is BreakerState.HALF_OPEN and cb.allows()
    cb.record_failure()  # one failure while half-open reopens
    assert cb.state is BreakerState.OPEN
    clock.now += 10
    cb.record_success()
    assert cb.state is BreakerState.HALF_OPEN
    cb.record_success()
    assert cb.state is BreakerState.CLOSED


def test_disabled_circuit_breaker_always_allows() -> None:
    cb = CircuitBreaker(failure_threshold=1, success_threshold=1, timeout_secs=60, enabled=False)
    for _ in range(5):
        cb.record_failure()
    assert cb.allows()


def test_worker_health_thresholds_and_pool_candidates() -> None:
    config = RouterConfig(health_failure_threshold=2, health_success_threshold=3)
    a = Worker(WorkerSpec("http://a:1", Role.DECODE), config)
    b = Worker(WorkerSpec("http://b:1", Role.DECODE), config)
    pool = WorkerPool(Role.DECODE)
    pool.add(a)
    pool.add(b)
    a.record_health(False)
    assert a.healthy
    a.record_health(False)
    assert not a.healthy
    assert pool.candidates(set()) == [b]
    assert pool.candidates({"http://b:1"}) == [b]  # excluded but the only one left
    for _ in range(2):
        a.record_health(True)
    assert not a.healthy
    a.record_health(True)
    assert a.healthy
    assert pool.candidates({"http://b:1"}) == [a]
    with pytest.raises(ValueError, match="already registered"):
        pool.add(Worker(WorkerSpec("http://a:1/", Role.DECODE), config))
    with pytest.raises(ValueError, match="prefill"):
        pool.add(Worker(WorkerSpec("http://c:1", Role.PREFILL), config))
