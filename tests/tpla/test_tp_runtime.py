"""TP ranks as processes: start, serve, and die loudly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

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


def _run_script(tmp_path, source: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, cwd=tmp_path,
    )


def test_an_idle_tp_engine_outlives_the_collective_timeout(tmp_path, tiny_v3_dir):
    """Ranks > 0 wait for rank 0's next operation without a timeout: idle is forever, not 300 s."""
    result = _run_script(tmp_path, f"""
        import time
        from tpla_serve import Engine

        if __name__ == "__main__":
            engine = Engine(model_path={str(tiny_v3_dir)!r}, dtype="float32", device="cpu", page_size=4,
                            tp_size=2, max_total_tokens=256)
            params = {{"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}
            first = engine.generate("def f(x):", params)["output_ids"]
            time.sleep(6)  # three collective timeouts of idle
            assert engine.generate("def f(x):", params)["output_ids"] == first
            engine.shutdown()
            print("served after idle")
    """, {"TPLA_TP_TIMEOUT_S": "2"}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served after idle" in result.stdout


def test_a_rank_that_dies_while_starting_is_reported_with_the_main_guard_fix(tmp_path, tiny_v3_dir):
    """Engine(tp_size=2) at a script's top level: the spawned rank re-imports the script and dies at once;
    rank 0 says so (and how to fix it) instead of waiting for the rendezvous timeout."""
    result = _run_script(tmp_path, f"""
        from tpla_serve import Engine

        engine = Engine(model_path={str(tiny_v3_dir)!r}, dtype="float32", device="cpu", page_size=4, tp_size=2)
    """, {}, timeout=120)
    assert result.returncode != 0
    assert "TP rank 1 (exit code 1) died before it could start" in result.stderr
    assert 'if __name__ == "__main__":' in result.stderr
