"""PD-aware router for tpla-serve prefill/decode servers (and any SGLang PD servers)."""

from .config import Role, RouterConfig, WorkerSpec

__all__ = ["Role", "RouterConfig", "WorkerSpec"]
