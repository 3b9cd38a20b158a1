"""The offline Engine against transformers' own generate, and its batching and memory behaviour."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tpla_serve import Engine

PROMPTS = [
    "def fibonacci(n):",
    "The quick brown fox",
    "import os\nimport sys\n\nclass Engine:\n    def __init__(self, path):",
    "Paged attention keeps the latent KV cache in fixed-size pages. " * 6,
]


def hf_greedy(model_dir, prompt_ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """transformers' greedy generate, cut after the first EOS as a server returns it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    out = model.eval().generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos
    )[0, len(prompt_ids) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.mark.parametrize("arch", ["v2", "v3"])
def test_greedy_equals_transformers_generate(arch, tiny_v2_dir, tiny_v3_dir):
    model_dir = tiny_v2_dir if arch == "v2" else tiny_v3_dir
    engine = Engine(model_path=str(model_dir), dtype="float32", device="cpu", page_size=4)
    outs = engine.generate(PROMPTS, {"max_new_tokens": 24, "temperature": 0})
    for prompt, out in zip(PROMPTS, outs):
        ids = engine.tokenizer.encode(prompt)
        assert out["output_ids"] == hf_greedy(model_dir, ids, 24, eos=1), prompt
        assert out["meta_info"]["prompt_tokens"] == len(ids)
        assert out["meta_info"]["completion_tokens"] == len(out["output_ids"])


@pytest.mark.parametrize("chunked_prefill_size", [0, 7])
def test_batching_invariance(tiny_v3_dir, engine_v3, chunked_prefill_size):
    """A request's greedy output is the same alone and batched, with chunked prefill on and off."""
    params = {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True}
    alone = [engine_v3.generate(p, params)["output_ids"] for p in PROMPTS]
    engine = Engine(
        model_path=str(tiny_v3_dir), dtype="float32", device="cpu", page_size=4,
        chunked_prefill_size=chunked_prefill_size,
    )
    batched = [o["output_ids"] for o in engine.generate(PROMPTS, params)]
    assert batched == alone


def test_pages_all_return_after_random_requests_aborts_and_waits(tiny_v3_dir, engine_v3):
    """A pool far too small for the load: requests wait and are retracted, none is lost, every page returns,
    and greedy outputs are exactly those of an unconstrained engine."""
    engine = Engine(
        model_path=str(tiny_v3_dir), dtype="float32", device="cpu", page_size=4,
        max_total_tokens=96, chunked_prefill_size=16,
    )
    rng = random.Random(0)
    vocab = engine.runner.model_config.vocab_size
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randrange(1, 40))] for _ in range(24)]
    params = [{"max_new_tokens": rng.randrange(1, 30), "temperature": 0, "ignore_eos": True} for _ in prompts]
    reqs, _ = engine.add_requests(input_ids=prompts, sampling_params=params)
    aborted = {reqs[i].rid for i in (3, 11, 17)}
    steps = 0
    while engine.scheduler.has_work:
        engine.scheduler.step()
        steps += 1
        if steps == 5:
            for rid in aborted:
                engine.abort(rid)
        sched = engine.scheduler
        owned = sum(len(set(r.pages) - r.tree_pages) for r in sched.running)
        assert sched.allocator.num_used == owned + sched.cache.num_pages
    assert engine.scheduler.num_retractions > 0, "the pool was meant to run short"
    assert engine.scheduler.stats().pages_used == 0  # what is left is the prefix cache's, unlocked
    assert engine.scheduler.flush_cache()[0]
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_usable
    for req, prompt, p in zip(reqs, prompts, params):
        if req.rid in aborted:
            assert req.finish_reason["type"] == "abort"
            continue
        assert req.finish_reason == {"type": "length", "length": p["max_new_tokens"]}
        assert req.output_ids == engine_v3.generate(input_ids=prompt, sampling_params=p)["output_ids"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt": ""}, "prompt"),
        ({"input_ids": []}, "prompt"),
        ({"input_ids": [5] * 2000}, "prompt"),
        ({"input_ids": [5, 99999]}, "input_ids"),
        ({"input_ids": [5, -1]}, "input_ids"),
        ({"prompt": "hi", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"prompt": "hi", "sampling_params": {"max_new_tokens": 10**9}}, "max_new_tokens"),
        ({"prompt": "hi", "sampling_params": {"top_p": 0}}, "top_p"),
        ({"prompt": "hi", "sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"prompt": "hi", "sampling_params": {"temperature": -0.5}}, "temperature"),
        ({"prompt": "hi", "sampling_params": {"bogus": 1}}, "bogus"),
        ({"prompt": ["ok", ""], "sampling_params": None}, "prompt"),
    ],
)
def test_bad_input_is_a_clear_value_error(engine_v3, kwargs, field):
    with pytest.raises(ValueError, match=field):
        engine_v3.generate(**kwargs)
    assert not engine_v3.scheduler.has_work and not engine_v3.scheduler.requests
    out = engine_v3.generate("def fibonacci(n):", {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert len(out["output_ids"]) == 4


def test_logprobs_match_transformers(engine_v3, hf_v3):
    prompt = "def fibonacci(n):"
    out = engine_v3.generate(
        prompt, {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        return_logprob=True, logprob_start_len=0, top_logprobs_num=3, return_text_in_logprobs=True,
    )
    ids = engine_v3.tokenizer.encode(prompt)
    full = torch.tensor([ids + out["output_ids"]])
    with torch.no_grad():
        ref = torch.log_softmax(hf_v3(full).logits[0].float(), dim=-1)
    meta = out["meta_info"]
    inp = meta["input_token_logprobs"]
    assert [t[1] for t in inp] == ids and inp[0][0] is None
    assert inp[0][2] == engine_v3.tokenizer.decode([ids[0]])
    for pos in range(1, len(ids)):
        assert inp[pos][0] == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
        top = meta["input_top_logprobs"][pos]
        assert [t[1] for t in top] == ref[pos - 1].topk(3).indices.tolist()
    for i, (lp, tok, _) in enumerate(meta["output_token_logprobs"]):
        assert tok == out["output_ids"][i]
        assert lp == pytest.approx(ref[len(ids) - 1 + i, tok].item(), abs=1e-4)


def test_stop_strings_and_stop_tokens(engine_v3):
    base = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = engine_v3.generate("def fibonacci(n):", base)
    text, ids = full["text"], full["output_ids"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop in text
    cut = engine_v3.generate("def fibonacci(n):", base | {"stop": [stop]})
    assert cut["text"] == text[: text.index(stop)]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = engine_v3.generate("def fibonacci(n):", base | {"stop": [stop], "no_stop_trim": True})
    assert kept["text"] == text[: text.index(stop) + len(stop)]

    target = ids[5]
    first = ids.index(target)
    by_token = engine_v3.generate("def fibonacci(n):", base | {"stop_token_ids": [target], "ignore_eos": False})
    assert by_token["output_ids"] == ids[: first + 1]
    assert by_token["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}


def test_seeded_sampling_is_reproducible_alone_and_batched(engine_v3):
    params = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9, "sampling_seed": 1234}
    a = engine_v3.generate("The quick brown fox", params)["output_ids"]
    b = engine_v3.generate("The quick brown fox", params)["output_ids"]
    batch = engine_v3.generate(
        ["def fibonacci(n):", "The quick brown fox"],
        [{"max_new_tokens": 9, "temperature": 0.7, "sampling_seed": 5}, params],
    )
    assert a == b == batch[1]["output_ids"]


def test_streaming_is_cumulative_and_closing_aborts(engine_v3):
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    final = engine_v3.generate("def fibonacci(n):", params)
    chunks = list(engine_v3.generate("def fibonacci(n):", params, stream=True))
    texts = [c["text"] for c in chunks]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert texts[-1] == final["text"] and chunks[-1]["output_ids"] == final["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 12}

    stream = engine_v3.generate("def fibonacci(n):", params | {"max_new_tokens": 100}, stream=True)
    next(stream)
    next(stream)
    stream.close()
    assert engine_v3.scheduler.stats().pages_used == 0 and not engine_v3.scheduler.requests


def test_max_new_tokens_zero_returns_no_tokens(engine_v3):
    out = engine_v3.generate("def fibonacci(n):", {"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
