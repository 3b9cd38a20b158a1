"""Command line: `python -m tpla_router`, with flag names as SGLang's router where they overlap."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .app import run
from .config import LOG_LEVELS, POLICY_NAMES, Role, RouterConfig, WorkerSpec

API_KEY_ENV = "TPLA_API_KEY"
_DEFAULTS = RouterConfig()
_REDACTED = "<redacted>"
logger = logging.getLogger(__name__)


def add_router_args(parser: argparse.ArgumentParser, common: bool = True) -> None:
    """Add the router's flags to `parser` (also used by `python -m tpla_serve.launch --role router`).

    `common=False` leaves out --host, --port and --log-level, for a parser that defines them itself
    under the same names.
    """
    d = _DEFAULTS
    g = parser.add_argument_group("workers")
    g.add_argument("--prefill", nargs="+", action="append", default=[], metavar=("URL", "BOOTSTRAP_PORT"),
                   help="prefill server URL and optional bootstrap port (a number or 'none'); repeat per server")
    g.add_argument("--decode", action="append", default=[], metavar="URL",
                   help="decode server URL; repeat per server")
    g.add_argument("--pd-disaggregation", action="store_true",
                   help="accepted so SGLang router command lines work unchanged; this router is always PD")
    if common:
        g.add_argument("--host", default=d.host, help="address to listen on")
        g.add_argument("--port", type=int, default=d.port, help="port to listen on")

    g = parser.add_argument_group("routing policy")
    g.add_argument("--policy", choices=POLICY_NAMES, default=d.policy,
                   help="policy for both roles unless --prefill-policy / --decode-policy override it")
    g.add_argument("--prefill-policy", choices=POLICY_NAMES, default=None)
    g.add_argument("--decode-policy", choices=POLICY_NAMES, default=None)
    g.add_argument("--cache-threshold", type=float, default=d.cache_threshold,
                   help="cache_aware: minimum matched fraction of the prompt to follow the cache")
    g.add_argument("--balance-abs-threshold", type=int, default=d.balance_abs_threshold,
                   help="cache_aware: balance by load when max-min in-flight exceeds this ...")
    g.add_argument("--balance-rel-threshold", type=float, default=d.balance_rel_threshold,
                   help="... and max in-flight exceeds min times this")
    g.add_argument("--eviction-interval-secs", type=float, default=d.eviction_interval_secs,
                   help="cache_aware: seconds between prefix-tree evictions")
    g.add_argument("--max-tree-size", type=int, default=d.max_tree_size,
                   help="cache_aware: characters of prefix text kept per worker")

    g = parser.add_argument_group("requests")
    g.add_argument("--max-payload-size", type=int, default=d.max_payload_size,
                   help="largest request body in bytes (larger ones get 413)")
    g.add_argument("--max-new-tokens-cap", type=int, default=d.max_new_tokens_cap,
                   help="reject requests asking for more new tokens (400); OpenAI requests without a limit get it")
    g.add_argument("--request-timeout-secs", type=float, default=d.request_timeout_secs,
                   help="end-to-end limit per request, streaming included")
    g.add_argument("--retry-max-retries", type=int, default=d.retry_max_retries,
                   help="attempts in all, each on a new pair with a new room (1 = no retry)")
    g.add_argument("--retry-initial-backoff-ms", type=float, default=d.retry_initial_backoff_ms)
    g.add_argument("--retry-max-backoff-ms", type=float, default=d.retry_max_backoff_ms)
    g.add_argument("--retry-backoff-multiplier", type=float, default=d.retry_backoff_multiplier)
    g.add_argument("--retry-jitter-factor", type=float, default=d.retry_jitter_factor)
    g.add_argument("--disable-retries", action="store_true", help="same as --retry-max-retries 1")

    g = parser.add_argument_group("circuit breaker")
    g.add_argument("--cb-failure-threshold", type=int, default=d.cb_failure_threshold,
                   help="consecutive failed requests that open a worker's circuit")
    g.add_argument("--cb-success-threshold", type=int, default=d.cb_success_threshold,
                   help="successes while half-open that close it again")
    g.add_argument("--cb-timeout-duration-secs", type=float, default=d.cb_timeout_duration_secs,
                   help="seconds an open circuit waits before letting a trial request through")
    g.add_argument("--disable-circuit-breaker", action="store_true")

    g = parser.add_argument_group("health checks")
    g.add_argument("--health-failure-threshold", type=int, default=d.health_failure_threshold,
                   help="consecutive failed checks that mark a worker unhealthy")
    g.add_argument("--health-success-threshold", type=int, default=d.health_success_threshold,
                   help="consecutive passed checks that mark it healthy again")
    g.add_argument("--health-check-timeout-secs", type=float, default=d.health_check_timeout_secs)
    g.add_argument("--health-check-interval-secs", type=float, default=d.health_check_interval_secs)
    g.add_argument("--health-check-endpoint", default=d.health_check_endpoint)
    g.add_argument("--disable-health-check", action="store_true")

    g = parser.add_argument_group("security and logging")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health, and send the same "
                        f"key to the workers. Visible in ps: prefer ${API_KEY_ENV} or --api-key-file")
    g.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read the API key from this file (its only line)")
    g.add_argument("--enable-admin", action="store_true",
                   help="serve /add_worker and /remove_worker without an API key even when listening beyond "
                        "loopback (without a key they are off there by default)")
    if common:
        g.add_argument("--log-level", choices=LOG_LEVELS, default=d.log_level)


def _prefill_spec(values: list[str]) -> WorkerSpec:
    if len(values) > 2:
        raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(values)}")
    port: int | None = None
    if len(values) == 2 and values[1].lower() != "none":
        try:
            port = int(values[1])
        except ValueError:
            raise ValueError(f"--prefill bootstrap port must be a number or 'none', got {values[1]!r}") from None
    return WorkerSpec(values[0], Role.PREFILL, port)


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file or $TPLA_API_KEY (in that order; the two flags exclude each other)."""
    if args.api_key is not None and args.api_key_file is not None:
        raise ValueError("give the API key once: --api-key or --api-key-file")
    if args.api_key_file is not None:
        path = Path(args.api_key_file)
        try:
            key = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {path}: cannot read it ({e})") from None
        if not key or "\n" in key:
            raise ValueError(f"--api-key-file {path} must hold the key on its one line")
        return key
    if args.api_key is not None:
        return args.api_key
    return os.environ.get(API_KEY_ENV) or None


def redact_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with the value of --api-key hidden, for logging a command line."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(_REDACTED)
            hide_next = False
        elif arg == "--api-key":
            out.append(arg)
            hide_next = True
        elif arg.startswith("--api-key="):
            out.append("--api-key=" + _REDACTED)
        else:
            out.append(arg)
    return out


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """Build the config from parsed flags; raises ValueError naming the bad flag or value."""
    return RouterConfig(
        prefill=tuple(_prefill_spec(v) for v in args.prefill),
        decode=tuple(WorkerSpec(url, Role.DECODE) for url in args.decode),
        host=args.host,
        port=args.port,
        policy=args.policy,
        prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy,
        cache_threshold=args.cache_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        eviction_interval_secs=args.eviction_interval_secs,
        max_tree_size=args.max_tree_size,
        max_payload_size=args.max_payload_size,
        max_new_tokens_cap=args.max_new_tokens_cap,
        request_timeout_secs=args.request_timeout_secs,
        retry_max_retries=1 if args.disable_retries else args.retry_max_retries,
        retry_initial_backoff_ms=args.retry_initial_backoff_ms,
        retry_max_backoff_ms=args.retry_max_backoff_ms,
        retry_backoff_multiplier=args.retry_backoff_multiplier,
        retry_jitter_factor=args.retry_jitter_factor,
        cb_failure_threshold=args.cb_failure_threshold,
        cb_success_threshold=args.cb_success_threshold,
        cb_timeout_duration_secs=args.cb_timeout_duration_secs,
        disable_circuit_breaker=args.disable_circuit_breaker,
        health_failure_threshold=args.health_failure_threshold,
        health_success_threshold=args.health_success_threshold,
        health_check_timeout_secs=args.health_check_timeout_secs,
        health_check_interval_secs=args.health_check_interval_secs,
        health_check_endpoint=args.health_check_endpoint,
        disable_health_check=args.disable_health_check,
        api_key=resolve_api_key(args),
        enable_admin=args.enable_admin,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tpla_router",
                                     description="PD-aware router for prefill/decode LLM servers",
                                     allow_abbrev=False)
    add_router_args(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("command line: %s", " ".join(redact_argv(argv)))
    if args.api_key is not None:
        logger.warning("--api-key on the command line is visible to every user of this machine (ps); "
                       "prefer $%s or --api-key-file", API_KEY_ENV)
    run(config)
