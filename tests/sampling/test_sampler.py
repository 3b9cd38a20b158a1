"""The batched sampler against direct references computed here, one request at a time."""

from __future__ import annotations

import pytest
import torch

from tpla_serve.sampling import Sampler, SamplingBatch, SamplingParams
from tpla_serve.sampling.penalties import penalize
from tpla_serve.sampling.sampler import truncation_mask

V = 64
ALPHA = 1e-3  # significance level of every chi-square test below


def batch(params, output_ids=None, seeds=None, steps=None, eos=(), vocab=V):
    output_ids = output_ids if output_ids is not None else [[] for _ in params]
    seeds = seeds if seeds is not None else [1234 + i for i in range(len(params))]
    return SamplingBatch.build(params, output_ids, seeds, vocab, "cpu", eos_token_ids=eos, steps=steps)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= stat) for Pearson's statistic over the categories with nonzero expected count."""
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the support was drawn"
    expected = n * probs[support].double()
    stat = ((counts[support].double() - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 7) -> torch.Tensor:
    """n draws of one request from the same logits, one per step (the counter moves, the seed stays)."""
    logits = logits_row.expand(n, -1).contiguous()
    b = batch([params] * n, seeds=[seed] * n, steps=list(range(n)), vocab=logits.shape[1])
    ids = Sampler()(logits, b).next_token_ids
    return torch.bincount(ids, minlength=logits.shape[1])


# ---- greedy -------------------------------------------------------------------------------------


def test_greedy_is_exact_argmax_alone_and_in_a_mixed_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, V, generator=g) * 3
    greedy = SamplingParams(temperature=0.0)
    out = Sampler()(logits, batch([greedy] * 16))
    assert torch.equal(out.next_token_ids, logits.argmax(-1))
    mixed = [greedy if i % 2 == 0 else SamplingParams(temperature=1.3, top_p=0.8) for i in range(16)]
    out = Sampler()(logits, batch(mixed))
    assert torch.equal(out.next_token_ids[::2], logits[::2].argmax(-1))


def test_caller_logits_are_not_modified():
    logits = torch.randn(4, V)
    before = logits.clone()
    params = [SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.5, min_new_tokens=2)] * 4
    Sampler()(logits, batch(params, output_ids=[[1, 2]] * 4, eos=[0]), return_logprob=True)
    assert torch.equal(logits, before)


# ---- seeds -------------------------------------------------------------------------------------


def test_same_seed_same_tokens_whatever_the_batch():
    """A seeded request decoded alone and inside batches of changing company gives the same tokens."""
    g = torch.Generator().manual_seed(1)
    target = SamplingParams(temperature=0.9, top_p=0.95, sampling_seed=2024)
    steps = 12
    rows = torch.randn(steps, V, generator=g)

    alone = [
        int(Sampler()(rows[s : s + 1], batch([target], seeds=[2024], steps=[s])).next_token_ids[0])
        for s in range(steps)
    ]
    batched = []
    for s in range(steps):
        k = 1 + s % 5
        others = [SamplingParams(temperature=0.5 + 0.1 * j, top_k=3 + j) for j in range(k)]
        logits = torch.cat([torch.randn(k, V, generator=g), rows[s : s + 1]])
        b = batch(
            others + [target],
            seeds=[99 + j for j in range(k)] + [2024],
            steps=[s + 3 * j for j in range(k)] + [s],
        )
        batched.append(int(Sampler()(logits, b).next_token_ids[-1]))
    assert alone == batched
    again = [
        int(Sampler()(rows[s : s + 1], batch([target], seeds=[2024], steps=[s])).next_token_ids[0])
        for s in range(steps)
    ]
    assert again == alone


def test_different_seeds_differ():
    logits = torch.zeros(1, V)  # uniform: any two seeds agree on a token with probability 1/V
    p = SamplingParams(temperature=1.0)
    draws = {int(Sampler()(logits, batch([p], seeds=[s], steps=[0])).next_token_ids[0]) for s in range(40)}
    assert len(draws) > 15


# ---- distributions -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_empirical_distribution_matches_softmax(temperature):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 10, generator=g) * 1.5
    counts = draw_many(logits, SamplingParams(temperature=temperature), 12000)
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    assert chi_square_pvalue(counts, expected) > ALPHA


def reference_keep(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Tokens that top-k, top-p and min-p keep, from the definitions, one row, plain Python."""
    probs = torch.softmax(logits / p.temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = torch.zeros(len(probs), dtype=torch.bool)
    mass_before = 0.0
    for rank, i in enumerate(order):
        in_k = p.top_k == -1 or rank < p.top_k
        in_p = mass_before <= p.top_p + 1e-6
        in_min_p = probs[i] >= p.min_p * probs[order[0]]
        keep[i] = in_k and in_p and in_min_p
        mass_before += probs[i]
    return keep


TRUNCATIONS = [
    SamplingParams(temperature=1.0, top_k=4),
    SamplingParams(temperature=0.8, top_p=0.7),
    SamplingParams(temperature=1.2, min_p=0.15),
    SamplingParams(temperature=1.0, top_k=5, top_p=0.6),
    SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_p=0.05),  # only the most likely token survives
]


def test_truncation_mask_matches_definitions():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(len(TRUNCATIONS) * 3, 40, generator=g) * 2
    params = TRUNCATIONS * 3
    b = batch(params, vocab=40)
    mask = truncation_mask(logits / b.temperatures, b)
    for row, p in enumerate(params):
        assert torch.equal(mask[row], reference_keep(logits[row], p)), (row, p)


def test_truncation_mask_when_every_top_p_row_has_a_top_k():
    """The top-k head replaces the full sort; rows without any truncation must keep everything."""
    params = [
        SamplingParams(temperature=1.0, top_k=5, top_p=0.6),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=0.9, top_k=8, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=0.0, top_p=0.3),  # greedy: its mask is irrelevant
    ]
    b = batch(params, vocab=40)
    assert b.top_p_within_top_k and b.max_top_k == 8
    logits = torch.randn(len(params), 40, generator=torch.Generator().manual_seed(11)) * 2
    mask = truncation_mask(logits / b.temperatures, b)
    for row, p in enumerate(params[:4]):
        assert torch.equal(mask[row], reference_keep(logits[row], p)), (row, p)


@pytest.mark.parametrize("params", TRUNCATIONS[:5], ids=["top_k", "top_p", "min_p", "k+p", "k+p+min_p"])
def test_truncated_distribution_is_renormalized_softmax(params):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 12, generator=g) * 0.8
    keep = reference_keep(logits[0], params)
    assert 2 < int(keep.sum()) < 12  # the truncation is active and leaves a distribution to test
    probs = torch.softmax(logits[0] / params.temperature, dim=-1) * keep
    counts = draw_many(logits, params, 10000)
    assert chi_square_pvalue(counts, probs / probs.sum()) > ALPHA


# ---- penalties ---------------------------------------------------------------------------------


def reference_penalize(logits: list[float], output: list[int], p: SamplingParams) -> list[float]:
    out = []
    for tok, x in enumerate(logits):
        c = output.count(tok)
        if c:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            x -= p.frequency_penalty * c + p.presence_penalty
        out.append(x)
    return out


def test_penalties_match_reference_formula():
    g = torch.Generator().manual_seed(6)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.7),
        SamplingParams(temperature=0.0, frequency_penalty=0.9),
        SamplingParams(temperature=0.0, presence_penalty=-1.2),
        SamplingParams(temperature=0.0, frequency_penalty=0.4, presence_penalty=0.3, repetition_penalty=0.6),
        SamplingParams(temperature=0.0),  # unpenalized row in the same batch
    ]
    outputs = [torch.randint(0, 20, (n,), generator=g).tolist() for n in (15, 30, 8, 25, 10)]
    logits = torch.randn(len(params), 20, generator=g) * 2
    expected = torch.tensor(
        [reference_penalize(logits[i].tolist(), outputs[i], p) for i, p in enumerate(params)]
    )
    out = Sampler()(logits, batch(params, outputs, vocab=20), return_logprob=True, top_logprobs_nums=[20] * 5)
    assert torch.equal(out.next_token_ids, expected.argmax(-1))
    ref_lp = torch.log_softmax(expected, dim=-1)
    torch.testing.assert_close(out.logprobs, ref_lp.gather(1, out.next_token_ids[:, None]).squeeze(1))
    got_full = torch.empty_like(ref_lp).scatter_(1, out.top_logprobs_ids, out.top_logprobs_vals)
    torch.testing.assert_close(got_full, ref_lp)


def test_penalize_counts_are_scatter_of_generated_tokens_only():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    got = penalize(logits, counts, torch.tensor([[0.5]]), torch.tensor([[0.25]]), torch.tensor([[2.0]]))
    torch.testing.assert_close(got, torch.tensor([[2.0 / 2 - 1.5 - 0.25, -2.0 * 2 - 0.5 - 0.25, 1.0, 0.5]]))


# ---- min_new_tokens ------------------------------------------------------------------------------


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(4, V)
    logits[:, 0] = 50.0  # EOS overwhelmingly likely
    logits[:, 7] = 49.0  # a request stop token, next in line
    p = SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[7])
    ignore = SamplingParams(temperature=0.0, min_new_tokens=3, ignore_eos=True)
    outputs = [[5, 5], [5, 5, 5], [5], [5]]
    out = Sampler()(
        logits, batch([p, p, ignore, SamplingParams(temperature=0.0)], outputs, eos=[0]), return_logprob=True
    )
    ids = out.next_token_ids.tolist()
    assert ids[0] not in (0, 7) and ids[0] == int(logits[0, 1:7].argmax()) + 1
    assert ids[1] == 0  # min reached: EOS allowed again
    assert ids[2] != 0  # SGLang masks EOS during min_new_tokens even with ignore_eos
    assert ids[3] == 0  # no min_new_tokens
    assert out.logprobs[0] > -1e30  # the chosen token has a real logprob
    sampled = Sampler()(
        logits, batch([SamplingParams(temperature=1.0, min_new_tokens=3)] * 4, [[1]] * 4, eos=[0])
    )
    assert 0 not in sampled.next_token_ids.tolist()


# ---- logprobs ----------------------------------------------------------------------------------


def test_logprobs_follow_sglang_temperature_scaled():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, V, generator=g) * 2
    temps = [0.0, 0.5, 1.0, 1.7, 0.0, 0.9]
    params = [SamplingParams(temperature=t, top_k=10 if i % 2 else -1) for i, t in enumerate(temps)]
    nums = [0, 3, 5, 1, 2, 0]
    out = Sampler()(logits, batch(params), return_logprob=True, top_logprobs_nums=nums)
    scale = torch.tensor([t if t > 0 else 1.0 for t in temps]).unsqueeze(1)
    ref = torch.log_softmax(logits / scale, dim=-1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.next_token_ids[:, None]).squeeze(1))
    ids, lp = out.tolist()
    lps, top_vals, top_ids = lp.values, lp.top_values, lp.top_ids
    assert ids == out.next_token_ids.tolist() and len(lps) == 6
    for row, k in enumerate(nums):
        ref_vals, ref_ids = ref[row].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert top_ids[row] == ref_ids.tolist()
        torch.testing.assert_close(torch.tensor(top_vals[row]), ref_vals)

    original = Sampler(return_original_logprob=True)(logits, batch(params), return_logprob=True)
    assert torch.equal(original.next_token_ids, out.next_token_ids)
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(original.logprobs, raw.gather(1, out.next_token_ids[:, None]).squeeze(1))


def test_all_greedy_logprobs_and_no_logprobs_when_not_asked():
    logits = torch.randn(3, V)
    out = Sampler()(logits, batch([SamplingParams(temperature=0.0)] * 3), return_logprob=True)
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1).max(-1).values)
    plain = Sampler()(logits, batch([SamplingParams(temperature=0.0)] * 3))
    assert plain.logprobs is None and plain.top_logprobs_vals is None
    assert plain.tolist() == (logits.argmax(-1).tolist(), None)


def test_shape_errors():
    b = batch([SamplingParams()] * 2)
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(3, V), b)
    with pytest.raises(ValueError, match="top_logprobs_nums"):
        Sampler()(torch.zeros(2, V), b, top_logprobs_nums=[1])
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingBatch.build([SamplingParams()], [[], []], [1], V, "cpu")


@pytest.mark.gpu
def test_gpu_matches_cpu_without_host_sync():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(32, 1000, generator=g) * 2
    params = [
        SamplingParams(
            temperature=0.0 if i % 4 == 0 else 0.8,
            top_p=0.9,
            top_k=50,
            repetition_penalty=1.2,
            min_new_tokens=25,
        )
        for i in range(32)
    ]
    outputs = [torch.randint(0, 1000, (20,), generator=g).tolist() for _ in range(32)]
    seeds = list(range(32))
    cpu = Sampler()(
        logits, SamplingBatch.build(params, outputs, seeds, 1000, "cpu", eos_token_ids=[3]), True, [5] * 32
    )
    dev_logits = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        b = SamplingBatch.build(params, outputs, seeds, 1000, "cuda", eos_token_ids=[3])
        dev = Sampler()(dev_logits, b, return_logprob=True, top_logprobs_nums=[5] * 32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(dev.next_token_ids.cpu(), cpu.next_token_ids)
    torch.testing.assert_close(dev.logprobs.cpu(), cpu.logprobs)
    torch.testing.assert_close(dev.top_logprobs_vals.cpu(), cpu.top_logprobs_vals)


_FUSED_CHECK = """
import torch
from tpla_serve.sampling.gumbel_triton import gumbel_argmax_cuda
from tpla_serve.sampling.sampler import gumbel_noise
g = torch.Generator().manual_seed(0)
z = torch.randn(4, 5000, generator=g)
z[1, 40:] = float("-inf")
lo = torch.tensor([1, 2, 0xFFFFFFFF, 5])
hi = torch.tensor([0, 7, 0xFFFFFFFF, 0])
steps = torch.tensor([0, 1, 2, 123456])
fused = gumbel_argmax_cuda(z, lo, hi, steps)
ref = (z.double() + gumbel_noise(lo, hi, steps, 5000)).argmax(-1)
assert torch.equal(fused, ref), (fused, ref)
"""


def test_fused_draw_kernel_matches_torch_definition_in_interpreter():
    """The CUDA kernel's hash and race, run by Triton's interpreter on the CPU in a child process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _FUSED_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
def test_fused_draw_kernel_matches_torch_definition_on_gpu():
    from tpla_serve.sampling.gumbel_triton import gumbel_argmax_cuda
    from tpla_serve.sampling.sampler import gumbel_noise

    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(64, 129280, device="cuda", generator=g) * 2
    z[::3, 1000:] = float("-inf")
    seeds = torch.randint(0, 2**32, (3, 64), device="cuda", generator=g)
    fused = gumbel_argmax_cuda(z, seeds[0], seeds[1], seeds[2])
    ref = (z.double() + gumbel_noise(seeds[0], seeds[1], seeds[2], z.shape[1])).argmax(-1)
    assert torch.equal(fused, ref)
