"""tpla-serve: disaggregated MLA serving with tensor-parallel latent attention."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tpla_serve.entrypoints.engine import Engine

__all__ = ["Engine"]


def __getattr__(name: str) -> Any:
    # The engine pulls in torch and transformers; import it only when asked for.
    if name == "Engine":
        from tpla_serve.entrypoints.engine import Engine

        return Engine
    raise AttributeError(name)
