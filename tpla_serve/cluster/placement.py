"""The launch lines of a placed cluster: each server node's and the router's flags (no Ray here).

A server is known by its node 0, which serves HTTP on `port` (and, on a prefill, KV bootstrap on
`bootstrap_port`) and, for a server spanning nodes, the TP rendezvous on `dist_port`. The ports are chosen
once, on the node, and kept when the server restarts on the same node, so its URL does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpla_serve.cluster.config import ClusterConfig, ServerSpec


@dataclass
class ServerAddress:
    hosts: list[str]  # node k's address, node 0 first
    port: int
    bootstrap_port: int | None  # prefill only
    dist_port: int | None  # servers spanning nodes only

    @property
    def url(self) -> str:
        return f"http://{self.hosts[0]}:{self.port}"


def ports_needed(spec: ServerSpec) -> int:
    """Ports node 0 of a server listens on: HTTP, the prefill's bootstrap, the multi-node rendezvous."""
    return 1 + (spec.role == "prefill") + (spec.nnodes > 1)


def address_from_ports(spec: ServerSpec, hosts: list[str], ports: list[int]) -> ServerAddress:
    it = iter(ports)
    port = next(it)
    bootstrap = next(it) if spec.role == "prefill" else None
    dist = next(it) if spec.nnodes > 1 else None
    return ServerAddress(hosts, port, bootstrap, dist)


def server_argv(config: ClusterConfig, spec: ServerSpec, where: ServerAddress, node: int) -> list[str]:
    """`python -m tpla_serve.launch` flags of node `node` of one server."""
    argv = ["--role", spec.role, "--host", where.hosts[node], "--port", str(where.port),
            "--tp-size", str(spec.tp_size)]
    if (model := config.model_of(spec)) is not None:
        argv += ["--model-path", model]
    if spec.role == "decode":
        argv += ["--tpla-groups", str(spec.tpla_groups)]
    if where.bootstrap_port is not None:
        argv += ["--disaggregation-bootstrap-port", str(where.bootstrap_port)]
    if where.dist_port is not None:
        argv += ["--nnodes", str(spec.nnodes), "--node-rank", str(node),
                 "--dist-init-addr", f"{where.hosts[0]}:{where.dist_port}"]
    return [*argv, *spec.args]


def router_argv(config: ClusterConfig, host: str, prefills: list[ServerAddress],
                decodes: list[ServerAddress]) -> list[str]:
    argv = ["--role", "router", "--host", host, "--port", str(config.router.port)]
    for p in prefills:
        argv += ["--prefill", p.url, str(p.bootstrap_port)]
    for d in decodes:
        argv += ["--decode", d.url]
    return [*argv, *config.router.args]
