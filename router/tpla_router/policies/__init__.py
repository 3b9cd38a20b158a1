"""Worker selection policies, built by name from the router config."""

from __future__ import annotations

from ..config import RouterConfig
from .base import LoadedWorker, Policy
from .cache_aware import CacheAwarePolicy
from .simple import PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy


def make_policy(name: str, config: RouterConfig) -> Policy:
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy()
    if name == "cache_aware":
        return CacheAwarePolicy(
            config.cache_threshold,
            config.balance_abs_threshold,
            config.balance_rel_threshold,
            config.max_tree_size,
        )
    raise ValueError(f"unknown policy {name!r}")


__all__ = [
    "CacheAwarePolicy",
    "LoadedWorker",
    "Policy",
    "PowerOfTwoPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "make_policy",
]
