"""The cluster file of `--role cluster`: which servers a Ray cluster runs, and what each needs.

    model_path: /models/DeepSeek-V3     # every role's model unless the role names its own
    router: {port: 30000, num_cpus: 1, args: ["--prefill-policy", "cache_aware"]}
    prefill: {replicas: 2, tp_size: 8, num_gpus: 8, num_cpus: 16}
    decode: {replicas: 1, tp_size: 16, tpla_groups: 2, nnodes: 2, num_gpus: 8, num_cpus: 16,
             args: ["--tpla-transform", "hadamard"]}

A server's TP ranks are one Ray placement group: `nnodes: 1` packs them on one node, `nnodes: N` spreads
them over N nodes (STRICT_SPREAD, tp_size / N ranks each) joined by the multi-node flags. num_gpus and
num_cpus are per node of a server. With every num_gpus 0 the same file runs a CPU-only cluster.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Flags the cluster sets itself: in a role's args they would contradict the placement.
_PLACED_FLAGS = ("--role", "--host", "--port", "--tp-size", "--tp", "--nnodes", "--node-rank",
                 "--dist-init-addr", "--disaggregation-mode", "--disaggregation-bootstrap-port",
                 "--model-path", "--tpla-groups")


@dataclass(frozen=True)
class ServerSpec:
    """The servers of one role: how many, their TP layout, and each node's Ray resources."""

    role: str
    replicas: int = 1
    tp_size: int = 1
    tpla_groups: int = 1
    nnodes: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    model_path: str | None = None
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"{self.role}:"
        if self.replicas < 1:
            raise ValueError(f"{where} replicas must be >= 1, got {self.replicas}")
        if self.tp_size < 1 or self.nnodes < 1 or self.tp_size % self.nnodes:
            raise ValueError(f"{where} tp_size ({self.tp_size}) must be a positive multiple of nnodes "
                             f"({self.nnodes})")
        if self.tpla_groups < 1 or self.tp_size % self.tpla_groups:
            raise ValueError(f"{where} tpla_groups ({self.tpla_groups}) must divide tp_size ({self.tp_size})")
        if self.role == "prefill" and self.tpla_groups != 1:
            raise ValueError("prefill: a prefill server runs exact MLA, tpla_groups must be 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"{where} num_cpus and num_gpus must be >= 0")
        _check_args(where, self.args)

    @property
    def bundle(self) -> dict[str, float]:
        """The Ray resources of one node of one server."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}


@dataclass(frozen=True)
class RouterSpec:
    port: int = 30000
    num_cpus: float = 1.0
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"router: port must be in 1..65535, got {self.port}")
        _check_args("router:", self.args)


@dataclass(frozen=True)
class ClusterConfig:
    prefill: ServerSpec
    decode: ServerSpec
    router: RouterSpec = field(default_factory=RouterSpec)
    model_path: str | None = None  # None: the servers' default, the bundled model

    def model_of(self, spec: ServerSpec) -> str | None:
        return spec.model_path or self.model_path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        _check_keys("the cluster file", data, {"model_path", "router", "prefill", "decode"})
        for role in ("prefill", "decode"):
            if not isinstance(data.get(role), dict):
                raise ValueError(f"the cluster file needs a {role}: section (a mapping)")
        return cls(
            prefill=_spec(ServerSpec, "prefill", data["prefill"], role="prefill"),
            decode=_spec(ServerSpec, "decode", data["decode"], role="decode"),
            router=_spec(RouterSpec, "router", data.get("router") or {}),
            model_path=data.get("model_path"),
        )

    @classmethod
    def load(cls, path: str) -> ClusterConfig:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--config {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"--config {path}: expected a mapping at the top")
        return cls.from_dict(data)


def _spec(cls: type, where: str, data: Any, **fixed: Any) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping")
    names = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    _check_keys(where, data, names)
    values = dict(data)
    if "args" in values:
        if not isinstance(values["args"], list) or not all(isinstance(a, str) for a in values["args"]):
            raise ValueError(f"{where}: args must be a list of strings (one command-line token each)")
        values["args"] = tuple(values["args"])
    return cls(**values, **fixed)


def _check_keys(where: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")


def _check_args(where: str, args: tuple[str, ...]) -> None:
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in _PLACED_FLAGS:
            raise ValueError(f"{where} args: {flag} is set by the cluster from its placement; use the file's "
                             "own keys (tp_size, nnodes, tpla_groups, model_path, port)")
