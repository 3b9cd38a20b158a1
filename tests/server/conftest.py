from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_procs import MAX_BODY_BYTES, ServerProcess, with_chat_template


@pytest.fixture(scope="session")
def chat_model_dir(tiny_v3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_chat_template(tiny_v3_dir, tmp_path_factory.mktemp("server-model") / "tiny-v3-chat")


@pytest.fixture(scope="session")
def server(chat_model_dir: Path) -> Iterator[ServerProcess]:
    """One standalone server for the session, with an API key, a small body limit and SGLang's metrics."""
    proc = ServerProcess(chat_model_dir, "--max-body-bytes", str(MAX_BODY_BYTES), "--enable-metrics")
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def engine(chat_model_dir: Path):
    """The in-process engine on the same model and settings: the reference for greedy outputs."""
    from tpla_serve import Engine

    eng = Engine(model_path=str(chat_model_dir), kv_cache_bytes=32 << 20)
    yield eng
    eng.shutdown()
