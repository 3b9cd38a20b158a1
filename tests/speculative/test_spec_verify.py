"""Draft-block verification: greedy against a direct loop, speculative sampling against the target's
exact distribution (chi-square, alpha = 1e-3), and two wrong rules that the same test rejects."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tpla_serve.sampling import SamplingParams
from tpla_serve.speculative.verify import (
    VerifyOutput,
    VerifyUniforms,
    accepted_lengths,
    build_verify_batch,
    correction_tokens,
    greedy_verify,
    processed_probs,
    speculative_verify,
)

ALPHA = 1e-3
V, K = 6, 3
BOS = V  # context row of the bigram tables before any token
N_TRIALS = 200_000
Verifier = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, VerifyUniforms], VerifyOutput]


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= stat) for Pearson's statistic over the categories with nonzero expected count."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a sequence outside the target's support was emitted"
    expected = counts.sum() * probs[support].double()
    stat = ((counts[support].double() - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


# ---- greedy ------------------------------------------------------------------------------------


def greedy_reference(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[list[int], list[list[int]]]:
    lens, seqs = [], []
    for row_logits, row_drafts in zip(logits.tolist(), drafts.tolist()):
        out = []
        for j, row in enumerate(row_logits):
            best = max(range(len(row)), key=lambda v: (row[v], -v))
            if j < len(row_drafts) and row_drafts[j] == best:
                out.append(best)
                continue
            out.append(best)
            break
        lens.append(len(out) - 1)
        seqs.append(out + [-1] * (len(row_logits) - len(out)))
    return lens, seqs


def test_greedy_verify_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    b, k, v = 256, 5, 7
    logits = torch.randn(b, k + 1, v, generator=g)
    argmax = logits.argmax(dim=-1)[:, :k]
    wrong = (argmax + torch.randint(1, v, (b, k), generator=g)) % v
    drafts = torch.where(torch.rand(b, k, generator=g) < 0.8, argmax, wrong)
    drafts[0], drafts[1] = argmax[0], wrong[1]  # all accepted, none accepted
    out = greedy_verify(logits, drafts)
    lens, seqs = greedy_reference(logits, drafts)
    assert out.accepted_len.tolist() == lens
    assert out.tokens.tolist() == seqs
    assert lens[0] == k and lens[1] == 0
    assert set(lens) == set(range(k + 1)), "the batch should mix every accepted length"


def test_greedy_verify_without_drafts_is_plain_argmax():
    logits = torch.randn(3, 1, 11, generator=torch.Generator().manual_seed(1))
    out = greedy_verify(logits, torch.empty(3, 0, dtype=torch.int64))
    assert out.accepted_len.tolist() == [0, 0, 0]
    assert out.tokens[:, 0].tolist() == logits[:, 0].argmax(dim=-1).tolist()


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="target"):
        greedy_verify(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.int64))
    u = VerifyUniforms.from_generator(2, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="draft_probs"):
        speculative_verify(torch.rand(2, 3, 5), torch.rand(2, 2, 4), torch.zeros(2, 2, dtype=torch.int64), u)


# ---- speculative sampling: a bigram target and draft over a tiny vocabulary ----------------------


def bigram_tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(V + 1, V, generator=g, dtype=torch.float64), dim=-1)
    draft = torch.softmax(torch.randn(V + 1, V, generator=g, dtype=torch.float64), dim=-1)
    return target, draft


def generate(
    target: torch.Tensor,
    draft: torch.Tensor,
    length: int,
    verify: Verifier,
    counter_based: bool,
    n: int = N_TRIALS,
) -> torch.Tensor:
    """[n, length] tokens, each trial decoding block after block from BOS; the draft samples from
    its own generator, the verifier from per-trial (seed, step) counters or a generator."""
    g_draft, g_verify = torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)
    draft_cdf = draft.cumsum(dim=-1)
    rows = torch.arange(n)
    out = torch.full((n, length), -1, dtype=torch.int64)
    filled = torch.zeros(n, dtype=torch.int64)
    while bool((filled < length).any()):
        ctx = torch.where(filled > 0, out[rows, (filled - 1).clamp(min=0)], BOS)
        contexts = [ctx]
        for _ in range(K):
            cdf = draft_cdf[contexts[-1]]
            u = torch.rand(n, 1, dtype=cdf.dtype, generator=g_draft) * cdf[:, -1:]
            contexts.append(torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=V - 1))
        contexts_t = torch.stack(contexts, dim=1)
        drafts = contexts_t[:, 1:]
        if counter_based:
            zeros = torch.zeros(n, dtype=torch.int64)
            uniforms = VerifyUniforms.from_seeds(rows, zeros, filled, K)
        else:
            uniforms = VerifyUniforms.from_generator(n, K, g_verify)
        res = verify(target[contexts_t], draft[contexts_t[:, :K]], drafts, uniforms)
        for j in range(K + 1):
            take = (j <= res.accepted_len) & (filled < length)
            out[rows[take], filled[take]] = res.tokens[take, j]
            filled += take.long()
    return out


def sequence_probs(target: torch.Tensor, length: int) -> torch.Tensor:
    """[V**length] exact probability of each token sequence under the target, row-major."""
    probs = target[BOS]
    for _ in range(length - 1):
        last = torch.arange(probs.numel()) % V
        probs = (probs.unsqueeze(1) * target[last]).reshape(-1)
    return probs


def sequence_counts(tokens: torch.Tensor) -> torch.Tensor:
    codes = torch.zeros(tokens.shape[0], dtype=torch.int64)
    for j in range(tokens.shape[1]):
        codes = codes * V + tokens[:, j]
    return torch.bincount(codes, minlength=V ** tokens.shape[1])


def wrong_acceptance(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor, u: VerifyUniforms) -> VerifyOutput:
    """Accepts with min(1, q/p) instead of min(1, p/q)."""
    a = accepted_lengths(torch.cat([q, p[:, -1:]], dim=1), p[:, :-1], d, u.accept)
    return VerifyOutput(a, _emit_like(d, a, correction_tokens(p, q, a, u.draw)))


def wrong_resampling(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor, u: VerifyUniforms) -> VerifyOutput:
    """Resamples a rejected position from p instead of norm(max(0, p - q))."""
    a = accepted_lengths(p, q, d, u.accept)
    return VerifyOutput(a, _emit_like(d, a, correction_tokens(p, torch.zeros_like(q), a, u.draw)))


def _emit_like(drafts: torch.Tensor, accepted: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    tokens = torch.cat([drafts, torch.full_like(drafts[:, :1], -1)], dim=1)
    return tokens.scatter(1, accepted.unsqueeze(1), last.unsqueeze(1))


@pytest.fixture(scope="module")
def tables() -> tuple[torch.Tensor, torch.Tensor]:
    return bigram_tables(3)


@pytest.mark.parametrize("counter_based", [True, False], ids=["seeded-counters", "generator"])
def test_speculative_sampling_is_lossless(tables, counter_based):
    target, draft = tables
    tokens = generate(target, draft, 3, speculative_verify, counter_based)
    assert chi_square_pvalue(sequence_counts(tokens[:, :1]), sequence_probs(target, 1)) > ALPHA
    assert chi_square_pvalue(sequence_counts(tokens[:, :2]), sequence_probs(target, 2)) > ALPHA
    assert chi_square_pvalue(sequence_counts(tokens), sequence_probs(target, 3)) > ALPHA


@pytest.mark.parametrize("wrong", [wrong_acceptance, wrong_resampling], ids=["accept-q/p", "resample-p"])
def test_the_same_test_rejects_a_wrong_rule(tables, wrong):
    target, draft = tables
    tokens = generate(target, draft, 3, wrong, counter_based=False)
    assert chi_square_pvalue(sequence_counts(tokens), sequence_probs(target, 3)) < 1e-12


def test_draft_equal_to_target_accepts_every_token(tables):
    target, _ = tables
    g = torch.Generator().manual_seed(5)
    n = 4096
    ctx = torch.randint(0, V + 1, (n,), generator=g)
    contexts = [ctx]
    for _ in range(K):
        contexts.append(torch.multinomial(target[contexts[-1]], 1, generator=g).squeeze(1))
    c = torch.stack(contexts, dim=1)
    u = VerifyUniforms.from_seeds(torch.arange(n), torch.full((n,), 7), torch.zeros(n, dtype=torch.int64), K)
    out = speculative_verify(target[c], target[c[:, :K]], c[:, 1:], u)
    assert out.accepted_len.eq(K).all()
    assert torch.equal(out.tokens[:, :K], c[:, 1:])


def test_counter_uniforms_are_reproducible_and_step_keyed():
    lo, hi = torch.tensor([1, 2, 1]), torch.tensor([0, 0, 0])
    a = VerifyUniforms.from_seeds(lo, hi, torch.tensor([5, 5, 6]), 4)
    b = VerifyUniforms.from_seeds(lo, hi, torch.tensor([5, 5, 6]), 4)
    assert torch.equal(a.accept, b.accept) and torch.equal(a.draw, b.draw)
    assert ((a.accept > 0) & (a.accept < 1)).all()
    assert torch.equal(a.accept[2, :3], a.accept[0, 1:])  # keyed by absolute step, not block offset
    assert not torch.equal(a.accept[0], a.accept[1])


# ---- the sampler's processing on both distributions ---------------------------------------------


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    if p.is_greedy:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    order = sorted(range(logits.numel()), key=lambda v: -probs[v].item())
    keep = torch.zeros(logits.numel(), dtype=torch.bool)
    before = 0.0
    for rank, v in enumerate(order):
        keep[v] = (p.top_k == -1 or rank < p.top_k) and before <= p.top_p + 1e-7
        keep[v] &= bool(probs[v] >= p.min_p * probs.max())
        before += probs[v].item()
    kept = probs * keep
    return (kept / kept.sum()).float()


PARAMS = [
    SamplingParams(temperature=0.8, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.6, top_k=4, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
]


def test_processed_probs_match_the_sampling_parameters():
    logits = 2.0 * torch.randn(len(PARAMS), 9, generator=torch.Generator().manual_seed(4))
    batch = build_verify_batch(
        PARAMS, [[]] * len(PARAMS), list(range(len(PARAMS))), [[]] * len(PARAMS), 1, 9, "cpu"
    )
    got = processed_probs(logits, batch)
    for row, p in enumerate(PARAMS):
        torch.testing.assert_close(got[row], reference_probs(logits[row], p), rtol=1e-5, atol=1e-6)


def test_verify_batch_rows_see_their_draft_prefix():
    params = [SamplingParams(temperature=0.7, frequency_penalty=1.0), SamplingParams(temperature=0.0)]
    batch = build_verify_batch(params, [[1, 2], [3]], [10, 20], [[4, 4], [5, 6]], 3, 8, "cpu")
    assert batch.steps.tolist() == [2, 3, 4, 1, 2, 3]
    assert batch.seeds_lo.tolist() == [10, 10, 10, 20, 20, 20]
    counts = batch.penalties.counts
    assert counts[:, 4].tolist() == [0.0, 1.0, 2.0]  # token 4 counted once per accepted draft prefix


@pytest.mark.parametrize("row", [0, 1, 2, 3])
def test_lossless_under_truncation(row):
    g = torch.Generator().manual_seed(20 + row)
    target_logits, draft_logits = torch.randn(2, V + 1, V, generator=g).unbind(0)
    params = [PARAMS[row]] * (V + 1)
    batch = build_verify_batch(params, [[]] * (V + 1), [0] * (V + 1), [[]] * (V + 1), 1, V, "cpu")
    target = processed_probs(target_logits, batch).double()
    draft = processed_probs(draft_logits, batch).double()
    assert (target == 0).any(), "truncation should exclude tokens the draft may still propose"
    tokens = generate(target, draft, 2, speculative_verify, counter_based=True, n=50_000)
    assert chi_square_pvalue(sequence_counts(tokens), sequence_probs(target, 2)) > ALPHA


def test_greedy_rows_reduce_to_greedy_verification():
    g = torch.Generator().manual_seed(8)
    b, k, v = 64, 4, 10
    target_logits, draft_logits = torch.randn(b, k + 1, v, generator=g), torch.randn(b, k, v, generator=g)
    greedy = SamplingParams(temperature=0.0)
    drafts = torch.where(
        torch.rand(b, k, generator=g) < 0.7, target_logits[:, :k].argmax(-1), draft_logits.argmax(-1)
    )
    tb = build_verify_batch([greedy] * b, [[]] * b, [0] * b, drafts.tolist(), k + 1, v, "cpu")
    db = build_verify_batch([greedy] * b, [[]] * b, [0] * b, drafts.tolist(), k, v, "cpu")
    p = processed_probs(target_logits.reshape(-1, v), tb).view(b, k + 1, v)
    q = processed_probs(draft_logits.reshape(-1, v), db).view(b, k, v)
    u = VerifyUniforms.from_generator(b, k, g)
    spec, exact = speculative_verify(p, q, drafts, u), greedy_verify(target_logits, drafts)
    assert torch.equal(spec.accepted_len, exact.accepted_len)
    assert torch.equal(spec.tokens, exact.tokens)
