"""The server's own first request, served before it reports ready (SGLang's warm-up; --skip-server-warmup).

One small greedy generation end to end: the first client does not pay for first-step costs, and a
server that cannot generate never reports ready. It runs without a bootstrap room, so a PD server serves
it alone, as it serves any request without one.
"""

from __future__ import annotations

import uuid
from typing import Any

from tpla_serve.sampling.params import SamplingParams
from tpla_serve.server.generation import collect
from tpla_serve.server.messages import GenerateRequest
from tpla_serve.server.scheduler_client import SchedulerClient

WARMUP_TEXT = "The capital city of France is"
WARMUP_IDS = (10, 11, 12)  # for a server without a tokenizer, as SGLang's warm-up sends
WARMUP_TOKENS = 8


def warmup_request(tokenizer: Any | None, vocab_size: int) -> GenerateRequest:
    ids = list(tokenizer.encode(WARMUP_TEXT)) if tokenizer is not None else [i % vocab_size for i in WARMUP_IDS]
    params = SamplingParams(max_new_tokens=WARMUP_TOKENS, temperature=0.0)
    return GenerateRequest(rid=f"warmup_{uuid.uuid4().hex}", input_ids=ids, sampling_params=params.to_dict())


async def warm_up(client: SchedulerClient, tokenizer: Any | None) -> None:
    """Serve the warm-up request; raises RuntimeError saying why it failed."""
    request = warmup_request(tokenizer, int(client.model_info.get("vocab_size") or max(WARMUP_IDS) + 1))
    group = client.submit([request], log_metrics=False, starting=True)
    try:
        output = (await collect(group, None))[0]
    except Exception as e:  # an APIError or whatever else failed it: the server must not report ready
        raise RuntimeError(f"the warm-up request failed: {e}") from e
    meta = output["meta_info"]
    if meta.get("completion_tokens", 0) < 1:
        raise RuntimeError(f"the warm-up request generated nothing: {meta.get('finish_reason')}")
