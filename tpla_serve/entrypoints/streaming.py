"""Streamed outputs in SGLang's shape: cumulative text and counts, output logprobs as increments.

Each streamed chunk of SGLang carries the text so far, `completion_tokens` and
`output_token_logprobs_length` so far, and only the output logprob entries that are new since the
previous chunk (the frontend's `text_async_iter(return_meta_data=True)` merges them back). The HTTP
front and the offline Engine stream through the same rule.
"""

from __future__ import annotations

from typing import Any

INCREMENTAL_KEYS = ("output_token_logprobs", "output_top_logprobs")


class LogprobIncrements:
    """Turns one request's cumulative outputs into stream chunks; one instance per streamed request."""

    def __init__(self) -> None:
        self._sent: dict[str, int] = {}

    def chunk(self, output: dict[str, Any]) -> dict[str, Any]:
        meta = output.get("meta_info")
        if not isinstance(meta, dict) or not any(key in meta for key in INCREMENTAL_KEYS):
            return output
        meta = dict(meta)
        for key in INCREMENTAL_KEYS:
            if key in meta:
                entries = meta[key]
                start = self._sent.get(key, 0)
                meta[key] = entries[start:]
                self._sent[key] = len(entries)
        return {**output, "meta_info": meta}
