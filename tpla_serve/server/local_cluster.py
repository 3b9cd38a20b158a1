"""`python -m tpla_serve.launch --role all`: a whole PD cluster on this machine, for trying things out.

One prefill server (exact MLA, T=1), one decode server (TPLA, T=2, g=2 by default) and a router in front,
each a `python -m tpla_serve.launch` child process on a free port. With --speculative-algorithm the decode
server speculates with a draft model (the bundled draft for the bundled model) and the prefill server
prefills the draft and streams its KV too. Waits until all are healthy, prints the router's URL with a
ready-to-paste request, restarts a child that dies (the others keep serving; the router's health checks
take a dead server out of rotation and back), and stops them all on Ctrl-C / SIGTERM. The API key and a
random secret made for this cluster, with which the two servers authenticate their KV transfers, reach the
children through their environment, never their command lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tpla_serve.config import API_KEY_ENV, DEFAULT_MODEL_PATH, DISAGGREGATION_SECRET_ENV, EngineConfig
from tpla_serve.net import free_port

# The project's draft model, trained with the bundled target (same tokenizer).
DEFAULT_DRAFT_MODEL_PATH = str(Path(DEFAULT_MODEL_PATH).parent / "mla-tiny-draft")

logger = logging.getLogger("tpla_serve.local_cluster")



RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # after the 1st, 2nd, ... consecutive failed start
STABLE_AFTER_S = 60.0  # a child up this long has its backoff reset


@dataclass
class Child:
    name: str
    url: str
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    started: float = 0.0
    restarts: int = 0  # consecutive restarts that did not last STABLE_AFTER_S


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tpla_serve.launch --role all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--role", choices=["all"], required=True)
    p.add_argument("--model-path", default=None, help="default: the servers' default, the bundled model")
    p.add_argument("--host", default="127.0.0.1", help="address every process listens on")
    p.add_argument("--port", type=int, default=30000, help="router port (0: a free port)")
    p.add_argument("--prefill-port", type=int, default=0)
    p.add_argument("--decode-port", type=int, default=0)
    p.add_argument("--disaggregation-bootstrap-port", type=int, default=0,
                   help="the prefill server's bootstrap port (0: a free port)")
    p.add_argument("--decode-tp-size", type=int, default=2)
    p.add_argument("--decode-tpla-groups", type=int, default=2)
    p.add_argument("--speculative-algorithm", default="none", choices=["none", "standard", "easyspec"],
                   help="the decode server speculates with a draft model")
    p.add_argument("--speculative-draft-model-path", default=None,
                   help="default: the bundled draft, when the model is the bundled one")
    p.add_argument("--speculative-num-draft-tokens", type=int, default=EngineConfig.speculative_num_draft_tokens)
    p.add_argument("--prefill-args", default="", help="extra flags for the prefill server, one string")
    p.add_argument("--decode-args", default="", help="extra flags for the decode server, one string")
    p.add_argument("--router-args", default="", help="extra flags for the router, one string")
    p.add_argument("--api-key", default=None,
                   help=f"one key for the router and both servers (or set {API_KEY_ENV}, or --api-key-file)")
    p.add_argument("--api-key-file", default=None, help="a file holding the API key")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for health")
    p.add_argument("--log-level", default="info")
    return p


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tpla_serve.launch", *args], env={**os.environ, **env})


def _launch(name: str, args: list[str], url: str, env: dict[str, str]) -> Child:
    logger.info("starting %s: %s", name, shlex.join(["python", "-m", "tpla_serve.launch", *args]))
    return Child(name, url, args, env, _spawn(args, env), time.monotonic())


def _supervise(children: list[Child]) -> None:
    """Restart a child that exited, with a backoff while it keeps failing; the others keep running."""
    now = time.monotonic()
    for child in children:
        code = child.proc.poll()
        if code is None:
            if now - child.started > STABLE_AFTER_S:
                child.restarts = 0
            continue
        delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
        if now < child.started + delay:  # `started` is the exit time until the restart below
            continue
        logger.warning("the %s exited with code %s; restarting it (restart %d)", child.name, code,
                       child.restarts + 1)
        child.proc = _spawn(child.args, child.env)
        child.started = now
        child.restarts += 1


def _api_key(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    if args.api_key is not None and args.api_key_file is not None:
        parser.error("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:
            return Path(args.api_key_file).read_text().strip() or None
        except OSError as e:
            parser.error(f"--api-key-file: {e}")
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def _healthy(child: Child, api_key: str | None) -> bool:
    req = urllib.request.Request(child.url + "/health")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_healthy(children: list[Child], api_key: str | None, deadline: float) -> None:
    pending = list(children)
    while pending:
        for child in list(pending):
            code = child.proc.poll()
            if code is not None:
                raise RuntimeError(f"the {child.name} exited with code {code} while starting")
            if _healthy(child, api_key):
                logger.info("%s is healthy at %s", child.name, child.url)
                pending.remove(child)
        if pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not healthy in time: {', '.join(c.name for c in pending)}")
            time.sleep(0.5)


def _stop(children: list[Child], timeout: float = 30.0) -> None:
    for child in children:
        if child.proc.poll() is None:
            child.proc.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("killing the %s (pid %d): it did not stop in time", child.name, child.proc.pid)
            child.proc.kill()
            child.proc.wait()


def _example(router_url: str, api_key: str | None) -> str:
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if api_key else ""
    body = json.dumps({"text": "def fibonacci(n):",
                       "sampling_params": {"max_new_tokens": 32, "temperature": 0}})
    return (f"curl -s {router_url}/generate -H 'Content-Type: application/json'{auth} -d '{body}'")


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def _speculative_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(prefill flags, decode flags) for speculative decoding: the decode drafts, the prefill streams draft KV."""
    if args.speculative_algorithm == "none":
        return [], []
    draft = args.speculative_draft_model_path
    if draft is None:
        if args.model_path is not None:
            parser.error("--speculative-algorithm with --model-path needs --speculative-draft-model-path")
        draft = DEFAULT_DRAFT_MODEL_PATH
    decode = ["--speculative-algorithm", args.speculative_algorithm, "--speculative-draft-model-path", draft,
              "--speculative-num-draft-tokens", str(args.speculative_num_draft_tokens)]
    return ["--speculative-draft-model-path", draft], decode


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prefill_spec, decode_spec = _speculative_args(parser, args)
    api_key = _api_key(args, parser)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s all %(levelname)s: %(message)s")
    host = args.host
    ports = {name: getattr(args, name) or free_port(host)
             for name in ("port", "prefill_port", "decode_port", "disaggregation_bootstrap_port")}
    common = ["--host", host, "--log-level", args.log_level]
    if args.model_path:
        common += ["--model-path", args.model_path]
    prefill_url = f"http://{host}:{ports['prefill_port']}"
    decode_url = f"http://{host}:{ports['decode_port']}"
    router_url = f"http://{host}:{ports['port']}"
    bootstrap = str(ports["disaggregation_bootstrap_port"])
    env = {API_KEY_ENV: api_key} if api_key else {}
    server_env = {**env, DISAGGREGATION_SECRET_ENV: secrets.token_urlsafe(32)}
    children: list[Child] = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background job starts with it ignored
        signal.signal(sig, _raise_stop)
    try:
        children.append(_launch("prefill server", [
            "--role", "prefill", "--disaggregation-mode", "prefill", *common,
            "--port", str(ports["prefill_port"]), "--disaggregation-bootstrap-port", bootstrap,
            "--tp-size", "1", *prefill_spec, *shlex.split(args.prefill_args)], prefill_url, server_env))
        children.append(_launch("decode server", [
            "--role", "decode", "--disaggregation-mode", "decode", *common,
            "--port", str(ports["decode_port"]), "--disaggregation-bootstrap-port", bootstrap,
            "--tp-size", str(args.decode_tp_size), "--tpla-groups", str(args.decode_tpla_groups),
            *decode_spec, *shlex.split(args.decode_args)], decode_url, server_env))
        deadline = time.monotonic() + args.startup_timeout
        _wait_healthy(children, api_key, deadline)
        router_args = ["--role", "router", "--host", host, "--port", str(ports["port"]),
                       "--prefill", prefill_url, bootstrap, "--decode", decode_url,
                       "--log-level", args.log_level, *shlex.split(args.router_args)]
        children.append(_launch("router", router_args, router_url, env))
        _wait_healthy(children[-1:], api_key, deadline)
        print(f"\ntpla-serve is ready at {router_url}  (prefill {prefill_url}, decode {decode_url})\n"
              f"Try:\n  {_example(router_url, api_key)}\n\nCtrl-C stops everything.\n", flush=True)
        while True:
            _supervise(children)
            time.sleep(0.5)
    except _Stop:
        logger.info("stopping")
        return 0
    except RuntimeError as e:
        logger.error("%s; stopping the rest", e)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        _stop(children)
