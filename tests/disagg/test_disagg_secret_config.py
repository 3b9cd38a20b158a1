"""Where a server's disaggregation secret comes from, and that it shows up in no repr and no command line."""

from __future__ import annotations

import argparse
import signal
import subprocess
from collections.abc import Sequence

import pytest

from tpla_serve.config import DISAGGREGATION_SECRET_ENV, EngineConfig, ServerConfig
from tpla_serve.flags import add_engine_args, add_server_args, server_config_from_cli
from tpla_serve.server import local_cluster


def _server_config(argv: Sequence[str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    add_server_args(parser)
    return server_config_from_cli(parser.parse_args(["--disaggregation-mode", "prefill", *argv]))


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        (["--disaggregation-secret", "from-flag", "--api-key", "key"], "from-env", "from-flag"),
        (["--api-key", "key"], "from-env", "from-env"),
        (["--api-key", "key"], None, "key"),
        ([], None, None),
    ],
    ids=["flag", "environment", "api-key", "none"],
)
def test_the_secret_is_the_flag_then_the_environment_then_the_api_key(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: str | None, expected: str | None
) -> None:
    if env is None:
        monkeypatch.delenv(DISAGGREGATION_SECRET_ENV, raising=False)
    else:
        monkeypatch.setenv(DISAGGREGATION_SECRET_ENV, env)
    assert _server_config(argv).engine.disaggregation_secret == expected


def test_an_empty_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISAGGREGATION_SECRET_ENV, "")
    with pytest.raises(ValueError, match="disaggregation_secret must not be empty"):
        _server_config([])


def test_reprs_leave_the_secrets_out() -> None:
    engine = EngineConfig(disaggregation_secret="s3cret-cluster")
    server = ServerConfig(engine, api_key="s3cret-key")
    assert "s3cret" not in repr(engine) and "s3cret" not in repr(server) and "s3cret" not in str(server)
    assert "disaggregation_secret" not in repr(engine) and "api_key" not in repr(server)


class _Exited:
    """Stands in for a child process that exits at once, so --role all stops right after starting two."""

    pid = 0

    def poll(self) -> int:
        return 1

    def wait(self, timeout: float | None = None) -> int:
        return 1


def test_role_all_gives_its_servers_one_random_secret_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave this process's handlers alone
    secrets = set()
    for _ in range(2):
        launched: list[tuple[list[str], dict[str, str] | None]] = []

        def popen(cmd: list[str], env: dict[str, str] | None = None, launched: list = launched) -> _Exited:
            launched.append((cmd, env))
            return _Exited()

        monkeypatch.setattr(subprocess, "Popen", popen)
        assert local_cluster.main(["--role", "all", "--api-key", "router-key", "--startup-timeout", "5"]) == 1
        (prefill_cmd, prefill_env), (decode_cmd, decode_env) = launched
        assert prefill_env is not None and decode_env is not None
        secret = prefill_env[DISAGGREGATION_SECRET_ENV]
        assert decode_env[DISAGGREGATION_SECRET_ENV] == secret and len(secret) >= 32
        assert not any(secret in arg for arg in prefill_cmd + decode_cmd)
        assert "--disaggregation-secret" not in prefill_cmd + decode_cmd
        secrets.add(secret)
    assert len(secrets) == 2  # fresh for every cluster
