"""Constrained decoding on CUDA (run on a GPU machine): the bitmask copied from pinned memory and applied on
the device, overlap scheduling (a constrained batch reads its pending step between forward and sampling,
with CUDA graphs replaying the forward) against the plain loop, and speculative blocks under a grammar."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tpla_serve import Engine

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
ARGS = {"model_path": str(ROOT / "models" / "mla-tiny"), "device": "cuda", "dtype": "float32"}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
REGEX = r"[0-9]{3}-[a-z]{2,5}"
PROMPTS = ["def fibonacci(n):", "def fibonacci(n):", "class A:", "for i in"]
PARAMS = [
    {"regex": REGEX, "temperature": 0, "max_new_tokens": 48},
    {"json_schema": json.dumps(SCHEMA), "temperature": 0, "max_new_tokens": 48},
    {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True},
    {"regex": r"[a-z ]+", "temperature": 0.8, "sampling_seed": 3, "max_new_tokens": 30},
]


def _run(**kw) -> list[dict]:
    with Engine(**ARGS, **kw) as engine:
        return engine.generate(PROMPTS, PARAMS)


def test_constrained_on_cuda_with_and_without_overlap_and_speculation():
    overlapped = _run()
    assert re.fullmatch(REGEX, overlapped[0]["text"])
    person = json.loads(overlapped[1]["text"])
    assert isinstance(person["name"], str) and len(person["name"]) <= 10 and isinstance(person["age"], int)
    assert re.fullmatch(r"[a-z ]*", overlapped[3]["text"])
    ids = [o["output_ids"] for o in overlapped]
    assert [o["output_ids"] for o in _run(disable_overlap_schedule=True)] == ids
    draft = str(ROOT / "models" / "mla-tiny-draft")
    spec = _run(speculative_algorithm="standard", speculative_draft_model_path=draft)
    assert [o["output_ids"] for o in spec[:3]] == ids[:3]  # greedy: exactly plain decoding
    assert re.fullmatch(r"[a-z ]*", spec[3]["text"])
