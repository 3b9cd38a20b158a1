"""The byte-level BPE: exact round trips of Python source, special tokens, saved files, chat template."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from training.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, load_tokenizer, save_tokenizer

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
TARGET_DIR = MODELS_DIR / "mla-tiny"
DRAFT_DIR = MODELS_DIR / "mla-tiny-draft"
_AWKWARD = "def f(\tx):\r\n    return 'caf\u00e9 \u4e2d\u6587 \U0001f600'  \n\n\x00\x7f   # trailing   \n"


def _assert_round_trips(tokenizer, texts) -> None:
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text


def test_trained_tokenizer_round_trips_held_out_source(small_tokenizer, stdlib_split) -> None:
    _assert_round_trips(small_tokenizer, [f.text for f in stdlib_split.held_out[:5]] + [_AWKWARD])


def test_special_tokens_and_bos_prefix(small_tokenizer) -> None:
    assert len(small_tokenizer) == 600
    assert small_tokenizer.convert_ids_to_tokens([0, 1, 2]) == [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    ids = small_tokenizer("import os").input_ids
    assert ids[0] == small_tokenizer.bos_token_id
    assert ids[1:] == small_tokenizer("import os", add_special_tokens=False).input_ids


def test_saved_files_load_through_transformers(small_tokenizer, tmp_path: Path) -> None:
    save_tokenizer(small_tokenizer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    for loaded in (
        AutoTokenizer.from_pretrained(str(tmp_path)),
        PreTrainedTokenizerFast.from_pretrained(str(tmp_path)),
    ):
        assert loaded("x = 1\n").input_ids == small_tokenizer("x = 1\n").input_ids
        assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


def test_chat_template_renders_turns_as_python_comments(small_tokenizer, tmp_path: Path) -> None:
    save_tokenizer(small_tokenizer, tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    messages = [
        {"role": "system", "content": "Write Python."},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b"},
        {"role": "user", "content": "def sub(a, b):"},
    ]
    expected = (
        f"{BOS_TOKEN}# system:\nWrite Python.\n# user:\ndef add(a, b):\n"
        f"# assistant:\n    return a + b{EOS_TOKEN}\n# user:\ndef sub(a, b):\n# assistant:\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def test_shipped_tokenizer_round_trips_python_source(stdlib_split) -> None:
    tokenizer = load_tokenizer(TARGET_DIR)
    assert len(tokenizer) == 4096
    _assert_round_trips(tokenizer, [f.text for f in stdlib_split.held_out[:8]] + [_AWKWARD])


def test_draft_ships_the_targets_tokenizer_files() -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (DRAFT_DIR / name).read_bytes() == (TARGET_DIR / name).read_bytes()
