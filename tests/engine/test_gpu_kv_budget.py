"""The GPU KV pool's size from --mem-fraction-static: this process's share of the device, so that servers
sharing one GPU (a PD pair on one card) each get their own fraction, never more than is free."""

from __future__ import annotations

from tpla_serve.engine.model_runner import GPU_HEADROOM_FRACTION, gpu_kv_budget

GIB = 1 << 30
TOTAL = 140 * GIB


def test_a_lone_server_takes_its_fraction_less_its_weights() -> None:
    weights = 10 * GIB
    free = TOTAL - weights - GIB  # the CUDA context
    assert gpu_kv_budget(TOTAL, free, weights, 0.85) == int(TOTAL * 0.85) - weights


def test_servers_sharing_a_gpu_each_get_their_own_fraction() -> None:
    """Three servers at 0.2 each: the third still gets 0.2 of the device less its weights, although the
    first two hold 40 % of it (sizing from free memory alone would leave it nothing)."""
    weights, free = 2 * GIB, TOTAL
    budgets = []
    for _ in range(3):
        free -= weights
        budget = gpu_kv_budget(TOTAL, free, weights, 0.2)
        budgets.append(budget)
        free -= budget
    assert budgets == [int(TOTAL * 0.2) - weights] * 3


def test_never_more_than_free_memory_less_the_headroom() -> None:
    free = 20 * GIB  # another program holds most of the device
    assert gpu_kv_budget(TOTAL, free, GIB, 0.85) == free - int(TOTAL * GPU_HEADROOM_FRACTION)


def test_a_fraction_below_the_weights_leaves_no_budget() -> None:
    assert gpu_kv_budget(TOTAL, TOTAL, 30 * GIB, 0.1) < 0
