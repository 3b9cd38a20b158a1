"""Speculative sampling through the engine is lossless (T = 2 over gloo; EasySpec on one device too).

A 16-token vocabulary target and a differently shaped draft (both random transformers checkpoints) make
the next-token distributions peaked and far apart. Thousands of seeded requests sample three tokens after
one prompt; the empirical marginals of the second and third output tokens (produced by verification:
accepted drafts, corrections, bonus tokens) are compared with the exact marginals computed from
transformers' own model, with temperature, top-k and top-p applied by a reference written here.
Chi-square test at significance ALPHA; a wrong acceptance rule in the engine fails the same test.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import tpla_serve.speculative.decoder as spec_decoder
from tests.conftest import tiny_config
from tpla_serve import Engine

ALPHA = 1e-3
VOCAB = 16
PROMPT = [3, 7, 2, 9, 4, 11]
NUM_SAMPLES = 2000
PARAMS = {"temperature": 0.9, "top_k": 12, "top_p": 0.95, "max_new_tokens": 6, "ignore_eos": True}


def _write(directory: Path, seed: int, **overrides) -> Path:
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = tiny_config("v3", VOCAB, initializer_range=0.4, **overrides)
    DeepseekV3ForCausalLM(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lossless")
    target = _write(root / "target", seed=1)
    draft = _write(root / "draft", seed=2, hidden_size=48, num_hidden_layers=4, kv_lora_rank=16, q_lora_rank=16)
    return target, draft


def _processed(logits: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k and top-p measured together on the untruncated softmax (SGLang's order)."""
    probs = torch.softmax(logits.double() / PARAMS["temperature"], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(probs.shape[-1])
    keep_sorted = (rank < PARAMS["top_k"]) & (sorted_p.cumsum(-1) - sorted_p <= PARAMS["top_p"])
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def _next_dists(model: torch.nn.Module, prefixes: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + p for p in prefixes])).logits[:, -1]
    return _processed(logits)


def _exact_marginals(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P(out0), P(out1), P(out2) of sampling from the target one token at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    p0 = _next_dists(model, [[]])[0]
    p1_given = _next_dists(model, [[u] for u in range(VOCAB)])  # [u, v]
    pairs = list(itertools.product(range(VOCAB), repeat=2))
    p2_given = _next_dists(model, [list(uv) for uv in pairs]).view(VOCAB, VOCAB, VOCAB)  # [u, v, w]
    p1 = p0 @ p1_given
    joint01 = p0[:, None] * p1_given
    p2 = torch.einsum("uv,uvw->w", joint01, p2_given)
    return p0, p1, p2


def _chi_square_pvalue(samples: list[int], expected_p: torch.Tensor) -> float:
    """Pearson's test; cells expected below 5 are pooled into one."""
    counts = torch.bincount(torch.tensor(samples), minlength=VOCAB).double()
    expected = expected_p * len(samples)
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    if (obs[exp == 0] > 0).any():
        return 0.0
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


def _sample(target: Path, draft: Path, algorithm: str, tp_size: int = 2) -> list[list[int]]:
    with Engine(
        model_path=str(target),
        skip_tokenizer_init=True,
        dtype="float32",
        device="cpu",
        tp_size=tp_size,
        easyspec_group_size=2 if algorithm == "easyspec" else None,
        speculative_algorithm=algorithm,
        speculative_draft_model_path=str(draft),
        speculative_num_draft_tokens=4,
    ) as engine:
        outs = engine.generate(
            input_ids=[PROMPT] * NUM_SAMPLES,
            sampling_params=[dict(PARAMS, sampling_seed=i) for i in range(NUM_SAMPLES)],
        )
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)
    return [o["output_ids"] for o in outs]


@pytest.fixture(scope="module")
def exact(models) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _exact_marginals(models[0])


def test_models_make_a_meaningful_test(models, exact):
    """The draft proposes from a clearly different distribution, else a wrong rule could pass."""
    draft_p0, draft_p1, _ = _exact_marginals(models[1])
    assert 0.5 * (draft_p0 - exact[0]).abs().sum() > 0.2
    assert 0.5 * (draft_p1 - exact[1]).abs().sum() > 0.2


@pytest.mark.parametrize(
    "algorithm,tp_size", [("standard", 2), ("easyspec", 2), ("easyspec", 1)],
    ids=["standard", "easyspec-layer-parallel", "easyspec-one-device"],
)
def test_speculative_sampling_matches_the_target(models, exact, algorithm, tp_size):
    outputs = _sample(*models, algorithm, tp_size)
    for position in (0, 1, 2):
        p = _chi_square_pvalue([o[position] for o in outputs], exact[position])
        assert p > ALPHA, f"output token {position}: chi-square p = {p:.2e}"


def test_a_wrong_acceptance_rule_fails(models, exact, monkeypatch):
    """Accepting every draft the target allows at all (instead of with probability min(1, p/q)) skews
    the output toward the draft: the same test rejects it."""
    real = spec_decoder.speculative_verify

    def accept_if_possible(p, q, drafts, uniforms, num_drafts=None):
        zeros = uniforms._replace(accept=torch.zeros_like(uniforms.accept))
        return real(p, q, drafts, zeros, num_drafts)

    monkeypatch.setattr(spec_decoder, "speculative_verify", accept_if_possible)
    outputs = _sample(*models, "easyspec")
    pvalues = [_chi_square_pvalue([o[pos] for o in outputs], exact[pos]) for pos in (1, 2)]
    assert min(pvalues) < ALPHA, f"the wrong rule went unnoticed: p = {pvalues}"
