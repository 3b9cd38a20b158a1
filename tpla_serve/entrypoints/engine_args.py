"""The offline Engine's keyword arguments, as `sglang.Engine(**kwargs)` takes them.

Engine fields go to EngineConfig; SGLang's options for features implemented differently here are checked
as on the command line (tpla_serve.sglang_options); `log_level` sets the level of tpla-serve's loggers;
options of the HTTP server (a port, an API key, parsers, ...) have nothing to act on offline and are
refused, as is any name neither knows, so no argument is dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from tpla_serve.config import LOG_LEVELS, EngineConfig, ServerConfig
from tpla_serve.sglang_options import SGLANG_OPTION_NAMES, check_sglang_options, draft_tokens_per_step

_ENGINE_FIELDS = frozenset(f.name for f in dataclasses.fields(EngineConfig))
_SERVER_FIELDS = frozenset(f.name for f in dataclasses.fields(ServerConfig)) - {"engine", "log_level"}
_SPECULATIVE_STEPS = "speculative_num_steps"


def engine_config(kwargs: dict[str, Any]) -> tuple[EngineConfig, str | None]:
    """The EngineConfig the arguments describe, and the log level they ask for (None: leave logging as is)."""
    unknown = set(kwargs) - _ENGINE_FIELDS - SGLANG_OPTION_NAMES - _SERVER_FIELDS - {"log_level", _SPECULATIVE_STEPS}
    if unknown:
        raise TypeError(f"Engine() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    server_only = sorted(set(kwargs) & _SERVER_FIELDS)
    if server_only:
        raise ValueError(f"Engine({server_only[0]}=...): an option of the HTTP server, which the offline Engine "
                         "does not run; give it to `python -m tpla_serve.launch`")
    check_sglang_options(kwargs)
    log_level = kwargs.get("log_level")
    if log_level is not None and str(log_level).lower() not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    fields = {k: v for k, v in kwargs.items() if k in _ENGINE_FIELDS}
    if _SPECULATIVE_STEPS in kwargs:
        fields["speculative_num_draft_tokens"] = draft_tokens_per_step(
            kwargs[_SPECULATIVE_STEPS], kwargs.get("speculative_num_draft_tokens"),
            EngineConfig.speculative_num_draft_tokens)
    return EngineConfig(**fields), None if log_level is None else str(log_level).lower()


def apply_log_level(level: str | None) -> None:
    if level is not None:
        logging.getLogger("tpla_serve").setLevel(level.upper())
