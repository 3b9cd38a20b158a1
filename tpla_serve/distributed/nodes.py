"""Where a server's TP ranks meet, and which address each node's ranks are reached at (DESIGN §7).

A server on one host keeps everything on loopback. A server spanning --nnodes hosts meets at
--dist-init-addr (node 0 serves the rendezvous store there), and every rank binds its control socket on
the address its node reaches node 0 from, so ranks on other hosts can connect to it; gloo (and NCCL's
bootstrap) use that address's interface unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say otherwise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from tpla_serve.config import EngineConfig
from tpla_serve.net import interface_of, route_address

logger = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Rendezvous:
    """The store's address (port 0: node 0 picks one, on a single host) and this node's own address."""

    store_host: str
    store_port: int
    address: str
    spans_nodes: bool

    @classmethod
    def of(cls, config: EngineConfig) -> Rendezvous:
        if config.nnodes == 1:
            return cls(LOOPBACK, 0, LOOPBACK, False)
        host, port = config.dist_init_host_port
        try:
            address = route_address(host, port)
        except OSError as e:
            raise RuntimeError(f"--dist-init-addr {config.dist_init_addr}: no route to node 0 ({e})") \
                from None
        return cls(host, port, address, True)


def latent_groups_within_nodes(config: EngineConfig) -> bool:
    """Whether every TPLA latent group's ranks (contiguous, T/g of them) sit on one node."""
    per_group = config.tp_size // config.tpla_groups
    return config.ranks_per_node % per_group == 0


def use_node_interface(address: str) -> None:
    """Point gloo and NCCL's bootstrap at the interface holding `address`, unless the environment chose one.
    Left alone, gloo takes the address the host name resolves to, which need not be on that network."""
    interface = interface_of(address)
    if interface is None:
        logger.warning("no interface holds %s; gloo and NCCL choose their own (set GLOO_SOCKET_IFNAME / "
                       "NCCL_SOCKET_IFNAME to the interface of the cluster network)", address)
        return
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(name, interface)
