"""Start a server: `python -m tpla_serve.launch --role prefill|decode|router|all|cluster ...`.

prefill / decode: an HTTP front plus its scheduler process (and TP ranks), flags as SGLang's
`launch_server`; with --nnodes N, node 0 serves and the other nodes (--node-rank k) run their TP ranks
only. router: tpla_router with SGLang router flags. all: a router, one prefill and one decode server on
this machine (see tpla_serve.server.local_cluster). cluster: the servers of a cluster file placed on a
Ray cluster (see tpla_serve.cluster.ray_cluster).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tpla_serve.config import ServerConfig

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Spelled out here rather than taken from tpla_serve.config, which imports torch: the router and the
# `all` supervisor start without it.
_ROLES = ("prefill", "decode", "router", "all", "cluster")


def _role_parser(*roles: str, formatter: type[argparse.HelpFormatter] = argparse.RawDescriptionHelpFormatter
                 ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tpla_serve.launch", description=__doc__,
                                     formatter_class=formatter, allow_abbrev=False)
    parser.add_argument("--role", choices=roles or _ROLES, required=True,
                        help="what this process serves: a prefill or decode server, the router, all three on "
                             "this machine, or a cluster file's servers on Ray")
    return parser


def server_parser() -> argparse.ArgumentParser:
    """The parser of `--role prefill|decode`: SGLang's launch_server flags."""
    from tpla_serve.flags import HelpFormatter, add_engine_args, add_server_args

    parser = _role_parser("prefill", "decode", formatter=HelpFormatter)
    add_engine_args(parser)
    add_server_args(parser)
    return parser


def _checked_config(args: argparse.Namespace) -> ServerConfig:
    """The server's config, once everything a launch line can get wrong without starting has been checked."""
    from tpla_serve.entrypoints.checkpoint import check_checkpoint
    from tpla_serve.flags import server_config_from_cli
    from tpla_serve.server.chat_template import resolve_chat_template

    config = server_config_from_cli(args)
    check_checkpoint(config.engine)
    if config.chat_template is not None:
        if config.engine.skip_tokenizer_init:
            raise ValueError("--chat-template: a server started with --skip-tokenizer-init has no tokenizer to "
                             "apply it with")
        resolve_chat_template(config.chat_template)
    return config


def _serve(role: str, argv: Sequence[str]) -> int:
    from tpla_serve.flags import inapplicable_flags

    parser = server_parser()
    args = parser.parse_args(argv)
    if not any(a == "--disaggregation-mode" or a.startswith("--disaggregation-mode=") for a in argv):
        args.disaggregation_mode = role  # a prefill or decode server pairs unless told otherwise
    try:
        config = _checked_config(args)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=config.log_level.upper(), format=f"%(asctime)s {role} %(levelname)s %(name)s: "
                                                                "%(message)s")
    for note in inapplicable_flags(args, config.engine):
        logging.getLogger("tpla_serve.launch").warning("%s", note)
    if config.engine.node_rank > 0:  # another node of a multi-node server: its TP ranks, no HTTP
        from tpla_serve.distributed.worker import run_node
        from tpla_serve.entrypoints.rank import worker_handlers

        return run_node(config.engine, worker_handlers)
    from tpla_serve.server.http_server import run_server

    return run_server(config)


def _route(argv: Sequence[str]) -> int:
    from tpla_router.app import run
    from tpla_router.cli import add_router_args, config_from_args
    from tpla_router.config import LOG_LEVELS, RouterConfig

    parser = _role_parser("router")
    defaults = RouterConfig()
    parser.add_argument("--host", default=defaults.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=defaults.port, help="port to listen on")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=defaults.log_level)
    add_router_args(parser, common=False)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=config.log_level.upper(), format=_LOG_FORMAT)
    run(config)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--role")
    role = peek.parse_known_args(argv)[0].role
    if role not in _ROLES:
        _role_parser().parse_args(argv)  # prints the usage error
        return
    try:
        if role == "router":
            sys.exit(_route(argv))
        if role == "all":
            from tpla_serve.server.local_cluster import main as run_all

            sys.exit(run_all(argv))
        if role == "cluster":
            from tpla_serve.cluster.ray_cluster import main as run_cluster

            sys.exit(run_cluster(argv))
        sys.exit(_serve(role, argv))
    except KeyboardInterrupt:  # Ctrl-C before serving began; everything started has been stopped
        sys.exit(130)


if __name__ == "__main__":
    main()
