"""TP ranks as processes: start, serve, and die loudly."""

from __future__ import annotations

import os
import signal

import pytest

from tpla_serve import Engine


def test_tp_engine_generates_like_one_process_and_a_dead_rank_is_a_clear_error(tiny_v3_dir, engine_v3):
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    expected = engine_v3.generate(["def fibonacci(n):", "The quick"], params)
    engine = Engine(model_path=str(tiny_v3_dir), dtype="float32", device="cpu", page_size=4, tp_size=2,
                    max_total_tokens=512)
    try:
        got = engine.generate(["def fibonacci(n):", "The quick"], params)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in expected]
        assert engine.get_server_info()["kv_bytes_per_token"] == engine.runner.kv_bytes_per_token
        rank1 = engine.runner.tp.processes.procs[0]
        os.kill(rank1.pid, signal.SIGKILL)
        rank1.join(10)
        with pytest.raises(RuntimeError, match="rank 1"):
            engine.generate("def fibonacci(n):", params)
    finally:
        engine.shutdown()
