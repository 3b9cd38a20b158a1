"""Router configuration: one frozen dataclass, validated once at construction."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from enum import Enum
from urllib.parse import urlsplit

POLICY_NAMES = ("round_robin", "random", "power_of_two", "cache_aware")
LOG_LEVELS = ("debug", "info", "warn", "warning", "error")


class Role(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


def normalize_url(url: str) -> str:
    """Validate a worker URL and strip the trailing slash so URLs compare equal."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"worker url must be http(s)://host[:port], got {url!r}")
    return url.rstrip("/")


@dataclass(frozen=True)
class WorkerSpec:
    url: str
    role: Role
    bootstrap_port: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normalize_url(self.url))
        if self.role is Role.DECODE and self.bootstrap_port is not None:
            raise ValueError("bootstrap_port applies to prefill workers only")
        if self.bootstrap_port is not None and not 0 < self.bootstrap_port < 65536:
            raise ValueError(f"bootstrap_port must be in 1..65535, got {self.bootstrap_port}")


@dataclass(frozen=True)
class RouterConfig:
    prefill: tuple[WorkerSpec, ...] = ()
    decode: tuple[WorkerSpec, ...] = ()
    host: str = "127.0.0.1"
    port: int = 30000
    policy: str = "cache_aware"
    prefill_policy: str | None = None
    decode_policy: str | None = None
    # cache_aware policy
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: float = 60.0
    max_tree_size: int = 1 << 26
    # requests (the body limit is the servers' own)
    max_payload_size: int = 32 << 20
    max_new_tokens_cap: int | None = None
    request_timeout_secs: float = 1800.0
    # retries: attempts in all, counted as SGLang's router counts them (1 disables retrying)
    retry_max_retries: int = 5
    retry_initial_backoff_ms: float = 50.0
    retry_max_backoff_ms: float = 30000.0
    retry_backoff_multiplier: float = 1.5
    retry_jitter_factor: float = 0.2
    # circuit breaker
    cb_failure_threshold: int = 10
    cb_success_threshold: int = 3
    cb_timeout_duration_secs: float = 60.0
    disable_circuit_breaker: bool = False
    # health checks: a dead worker leaves rotation within ~3 s without traffic, at once with it
    health_failure_threshold: int = 3
    health_success_threshold: int = 2
    health_check_timeout_secs: float = 1.0
    health_check_interval_secs: float = 1.0
    health_check_endpoint: str = "/health"
    disable_health_check: bool = False
    # security and logging
    api_key: str | None = field(default=None, repr=False)
    enable_admin: bool = False  # serve /add_worker and /remove_worker without an API key on any address
    log_level: str = "info"

    def __post_init__(self) -> None:
        for spec, role in [(s, Role.PREFILL) for s in self.prefill] + [(s, Role.DECODE) for s in self.decode]:
            if spec.role is not role:
                raise ValueError(f"worker {spec.url} is listed as {role.value} but has role {spec.role.value}")
        urls = [s.url for s in self.prefill + self.decode]
        if len(set(urls)) != len(urls):
            raise ValueError("worker urls must be unique across prefill and decode")
        for name in ("policy", "prefill_policy", "decode_policy"):
            value = getattr(self, name)
            if value is not None and value not in POLICY_NAMES:
                raise ValueError(f"{name} must be one of {POLICY_NAMES}, got {value!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_rel_threshold < 1.0:
            raise ValueError(f"balance_rel_threshold must be >= 1, got {self.balance_rel_threshold}")
        if not 0.0 <= self.retry_jitter_factor <= 1.0:
            raise ValueError(f"retry_jitter_factor must be in [0, 1], got {self.retry_jitter_factor}")
        if self.max_new_tokens_cap is not None and self.max_new_tokens_cap < 1:
            raise ValueError(f"max_new_tokens_cap must be >= 1, got {self.max_new_tokens_cap}")
        if not self.health_check_endpoint.startswith("/"):
            raise ValueError(f"health_check_endpoint must start with '/', got {self.health_check_endpoint!r}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty; omit it to disable authentication")
        positive = (
            "max_tree_size", "max_payload_size", "request_timeout_secs", "retry_max_retries",
            "retry_backoff_multiplier", "cb_failure_threshold", "cb_success_threshold",
            "health_failure_threshold", "health_success_threshold", "health_check_timeout_secs",
            "health_check_interval_secs", "eviction_interval_secs",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("balance_abs_threshold", "retry_initial_backoff_ms", "retry_max_backoff_ms",
                     "cb_timeout_duration_secs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")

    @property
    def loopback_only(self) -> bool:
        """Whether the router listens on a loopback address only (so only this machine reaches it)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def admin_open(self) -> bool:
        """Whether admin routes serve without an API key (with one, they need it like every route)."""
        return self.enable_admin or self.loopback_only

    def redacted(self) -> str:
        """Every setting, the API key shown only as set or not: the form for logs."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key":
                value = None if value is None else "<redacted>"
            elif f.name in ("prefill", "decode"):
                value = [s.url if s.bootstrap_port is None else f"{s.url} {s.bootstrap_port}" for s in value]
            parts.append(f"{f.name}={value}")
        return ", ".join(parts)

    @property
    def effective_prefill_policy(self) -> str:
        return self.prefill_policy or self.policy

    @property
    def effective_decode_policy(self) -> str:
        return self.decode_policy or self.policy
