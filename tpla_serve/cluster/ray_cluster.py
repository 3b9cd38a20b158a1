"""`python -m tpla_serve.launch --role cluster --ray-address ADDR --config cluster.yaml`: a PD cluster on Ray.

Places every prefill and decode server of the cluster file as one placement group (a bundle per node of
the server: packed on one node, or STRICT_SPREAD over `nnodes` nodes joined by the multi-node flags), runs
each node as an actor (tpla_serve.cluster.actors) and the router as one more, wired to every server. Then
it supervises: a server whose process ends or whose actor dies (Ray restarts the actor on its bundle) is
started again, all its nodes together, on the same ports; the router keeps it registered and its health
checks take it out of rotation and back. A server that comes back at another address (its bundle moved
to another node) is re-registered by restarting the router with the new list. Ctrl-C or SIGTERM stops
every process, kills the actors and removes the placement groups. The servers authenticate their KV
transfers with a secret made for this cluster, passed in their environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tpla_serve.cluster.actors import LaunchActor
from tpla_serve.cluster.config import ClusterConfig, ServerSpec
from tpla_serve.cluster.placement import (
    ServerAddress,
    address_from_ports,
    ports_needed,
    router_argv,
    server_argv,
)

logger = logging.getLogger("tpla_serve.cluster")
API_KEY_ENV = "TPLA_API_KEY"  # as tpla_serve.config names it; that module imports torch
SECRET_ENV = "TPLA_DISAGGREGATION_SECRET"
NAMESPACE = "tpla-serve"
POLL_S = 1.0
CALL_TIMEOUT_S = 120.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class Placed:
    """One server (or the router) as placed: its actors (node 0 first) and where it listens."""

    name: str
    spec: ServerSpec | None  # None: the router
    actors: list[Any]
    group: Any = None  # its placement group
    where: ServerAddress | None = None
    restarts: int = 0
    retry_at: float = 0.0
    env: dict[str, str] = field(default_factory=dict)


class RayCluster:
    def __init__(self, ray: Any, config: ClusterConfig, api_key: str | None, startup_timeout: float) -> None:
        self.ray = ray
        self.config = config
        self.api_key = api_key
        self.startup_timeout = startup_timeout
        key_env = {API_KEY_ENV: api_key} if api_key else {}
        self.server_env = {**key_env, SECRET_ENV: secrets.token_urlsafe(32)}
        self.router_env = key_env
        self.servers: list[Placed] = []
        self.router: Placed | None = None

    # ------------------------------------------------------------------ placing

    def _actor(self, name: str, num_cpus: float, num_gpus: float, group: Any = None, bundle: int = 0) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "num_cpus": num_cpus,
                                   "num_gpus": num_gpus, "max_restarts": -1}
        if group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, bundle)
        return self.ray.remote(LaunchActor).options(**options).remote()

    def place(self) -> None:
        from ray.util.placement_group import placement_group

        for spec in (self.config.prefill, self.config.decode):
            for i in range(spec.replicas):
                name = f"{spec.role}-{i}"
                strategy = "STRICT_PACK" if spec.nnodes == 1 else "STRICT_SPREAD"
                group = placement_group([spec.bundle] * spec.nnodes, strategy=strategy, name=f"tpla-{name}")
                try:
                    self.ray.get(group.ready(), timeout=self.startup_timeout)
                except self.ray.exceptions.GetTimeoutError:
                    raise RuntimeError(
                        f"cannot place {name}: {spec.nnodes} node(s) with {spec.bundle} each ({strategy}); "
                        f"the cluster has {self.ray.available_resources()} free") from None
                actors = [self._actor(f"tpla-{name}-node-{k}", spec.num_cpus, spec.num_gpus, group, k)
                          for k in range(spec.nnodes)]
                self.servers.append(Placed(name, spec, actors, group, env=self.server_env))
        router = self.config.router
        actor = self._actor("tpla-router", router.num_cpus, 0)
        self.router = Placed("router", None, [actor], env=self.router_env)

    # ------------------------------------------------------------------ starting

    def _call(self, refs: Any) -> Any:
        return self.ray.get(refs, timeout=CALL_TIMEOUT_S)

    def _start(self, placed: Placed) -> None:
        """(Re)start every node of `placed`, node 0 first, and wait until it is healthy."""
        self._stop_processes(placed)
        hosts = self._call([a.address.remote() for a in placed.actors])
        spec = placed.spec
        if spec is None:
            assert self.router is placed
            prefills = [s.where for s in self.servers if s.spec.role == "prefill"]  # type: ignore[union-attr]
            decodes = [s.where for s in self.servers if s.spec.role == "decode"]  # type: ignore[union-attr]
            argvs = [router_argv(self.config, hosts[0], prefills, decodes)]  # type: ignore[arg-type]
            ports = [self.config.router.port]
            url = f"http://{hosts[0]}:{self.config.router.port}"
        else:
            if placed.where is None or placed.where.hosts != hosts:  # first start, or moved to other nodes
                ports = self._call(placed.actors[0].free_ports.remote(ports_needed(spec)))
                placed.where = address_from_ports(spec, hosts, ports)
            where = placed.where
            ports = [p for p in (where.port, where.bootstrap_port, where.dist_port) if p is not None]
            argvs = [server_argv(self.config, spec, where, k) for k in range(spec.nnodes)]
            url = where.url
        for k, (actor, argv) in enumerate(zip(placed.actors, argvs)):
            logger.info("starting %s%s on %s: %s", placed.name, f" node {k}" if len(argvs) > 1 else "",
                        hosts[k], " ".join(argv))
            self._call(actor.start.remote(argv, placed.env, ports if k == 0 else []))
        self._wait_healthy(placed, url)

    def _wait_healthy(self, placed: Placed, url: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not self._call(placed.actors[0].healthy.remote(url, self.api_key)):
            if (why := self._down(placed)) is not None:
                raise RuntimeError(f"{placed.name} failed while starting: {why}")
            if placed is self.router:  # it is healthy once its servers are: bring back any that went down
                for server in self.servers:
                    if self._revive(server):
                        raise RuntimeError(f"{server.name} moved while the router started")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{placed.name} was not healthy at {url} within "
                                   f"{self.startup_timeout:.0f} s")
            time.sleep(POLL_S)
        logger.info("%s is healthy at %s", placed.name, url)

    def start(self) -> str:
        """Start every server, then the router; returns the router's URL."""
        for placed in self.servers:
            self._start(placed)
        assert self.router is not None
        self._start(self.router)
        host = self._call(self.router.actors[0].address.remote())
        return f"http://{host}:{self.config.router.port}"

    # ------------------------------------------------------------------ supervising

    def _down(self, placed: Placed) -> str | None:
        """Why `placed` is not running (a process ended, an actor died or restarted), or None."""
        try:
            codes = self._call([a.exit_code.remote() for a in placed.actors])
        except self.ray.exceptions.RayActorError as e:
            return f"its actor died ({type(e).__name__})"
        except self.ray.exceptions.GetTimeoutError:
            return None  # a busy node: ask again on the next round
        for k, code in enumerate(codes):
            if code == -1:
                return f"the actor of node {k} restarted"
            if code is not None:
                return f"node {k}'s process exited with code {code}"
        return None

    def supervise_once(self) -> None:
        assert self.router is not None
        for placed in self.servers:
            if self._revive(placed):
                logger.warning("%s moved to %s; restarting the router with the new address", placed.name,
                               placed.where.url if placed.where is not None else "?")
                self._start(self.router)
        self._revive(self.router)

    def _revive(self, placed: Placed) -> bool:
        """Restart `placed` if it is down (backing off after failed attempts); True if it came back at a
        new address, which the router must be told."""
        if time.monotonic() < placed.retry_at or (why := self._down(placed)) is None:
            return False
        logger.warning("%s is down (%s); restarting it (restart %d)", placed.name, why, placed.restarts + 1)
        before = placed.where.url if placed.where is not None else None
        try:
            self._start(placed)
        except (RuntimeError, self.ray.exceptions.RayError) as e:
            delay = RESTART_BACKOFF_S[min(placed.restarts, len(RESTART_BACKOFF_S) - 1)]
            logger.error("restarting %s failed: %s; next attempt in %.0f s", placed.name, e, delay)
            placed.retry_at = time.monotonic() + delay
            placed.restarts += 1
            return False
        placed.restarts = 0
        return placed is not self.router and placed.where is not None and placed.where.url != before

    # ------------------------------------------------------------------ teardown

    def _stop_processes(self, placed: Placed) -> None:
        for actor in placed.actors:
            try:
                self._call(actor.stop.remote())
            except self.ray.exceptions.RayError as e:
                logger.warning("stopping %s: %s", placed.name, e)

    def teardown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        everything = ([self.router] if self.router is not None else []) + self.servers
        for placed in everything:
            self._stop_processes(placed)
            for actor in placed.actors:
                self.ray.kill(actor, no_restart=True)
            if placed.group is not None:
                remove_placement_group(placed.group)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tpla_serve.launch --role cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--role", choices=["cluster"], required=True)
    p.add_argument("--ray-address", default="auto",
                   help="the Ray cluster to place on: HOST:PORT of its head, or auto (default: %(default)s)")
    p.add_argument("--config", required=True, help="the cluster file (YAML): models, TP sizes, resources")
    p.add_argument("--api-key", default=None,
                   help=f"one key for the router and every server (or set {API_KEY_ENV}) (default: none)")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds a placement or a server start may take (default: %(default)s)")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ClusterConfig.load(args.config)
    except ValueError as e:
        parser.error(str(e))
    try:
        import ray
    except ImportError:
        parser.error("--role cluster places servers with Ray, which is not installed: "
                     "pip install 'tpla-serve[ray]'")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s cluster %(levelname)s: %(message)s")
    ray.init(address=args.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    cluster = RayCluster(ray, config, api_key, args.startup_timeout)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    try:
        cluster.place()
        url = cluster.start()
        print(f"\ntpla-serve is ready at {url} ({len(cluster.servers)} servers on Ray). Ctrl-C stops "
              "everything.\n", flush=True)
        while True:
            cluster.supervise_once()
            time.sleep(POLL_S)
    except _Stop:
        logger.info("stopping")
        return 0
    except RuntimeError as e:
        logger.error("%s; stopping the rest", e)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        cluster.teardown()
        ray.shutdown()
