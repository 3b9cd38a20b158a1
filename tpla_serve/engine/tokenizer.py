"""Tokenizer and end-of-sequence ids from a local model directory (never a hub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """trust_remote_code: let transformers run tokenizer code shipped in the directory (--trust-remote-code)."""
    from transformers import AutoTokenizer

    directory = Path(path)
    if not (directory / "tokenizer.json").exists() and not (directory / "tokenizer_config.json").exists():
        raise FileNotFoundError(
            f"no tokenizer in {path} (tokenizer.json / tokenizer_config.json); pass --tokenizer-path, "
            "or --skip-tokenizer-init to serve token ids only"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def eos_token_ids(model_path: str, tokenizer: Any | None) -> set[int]:
    """generation_config.json's eos_token_id (int or list) first, as generation does; else the tokenizer's."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        f = Path(model_path) / name
        if f.exists():
            value = json.loads(f.read_text()).get("eos_token_id")
            if value is not None:
                ids.update(value if isinstance(value, list) else [value])
                return {int(t) for t in ids}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
