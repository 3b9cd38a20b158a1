"""`python -m tpla_serve.launch --role all`: router + prefill + decode (T=2, g=2) from one command."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from server_procs import alive, descendants, scheduler_pid


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start `--role all` with its output in `log`; return it and the router URL once it says it is ready."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError("the cluster did not come up:\n" + log.read_text()[-3000:])
        found = re.search(r"ready at (http://\S+)", log.read_text())
        if found:
            return proc, found.group(1)
        time.sleep(0.25)


def test_role_all_serves_through_the_router_and_stops_on_ctrl_c(chat_model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "all.log"
    small = "--kv-cache-bytes 33554432"
    cmd = [sys.executable, "-m", "tpla_serve.launch", "--role", "all", "--port", "0", "--model-path", str(chat_model_dir),
           "--prefill-args", small, "--decode-args", small, "--log-level", "warning"]
    proc, url = _start(cmd, log)
    try:
        assert "curl -s " + url + "/generate" in log.read_text()  # the copy-paste example
        body = {"text": "def fibonacci(n):", "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}
        r = httpx.post(url + "/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["completion_tokens"] == 6
        workers = httpx.get(url + "/server_info", timeout=30).json()
        assert "prefill" in str(workers) and "decode" in str(workers)

        tree = descendants(proc.pid)
        assert len(tree) >= 6  # router, 2 fronts, 2 schedulers, decode TP rank 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
        deadline = time.monotonic() + 30
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(tree), "processes left after Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_role_all_with_easyspec_decodes_like_the_target_alone(tmp_path: Path) -> None:
    """The bundled model and draft: the prefill streams draft KV, the decode (T=2, g=2) drafts layer-parallel;
    greedy answers equal the in-process TPLA engine's and carry the speculative counters."""
    from tpla_serve import Engine

    prompt, params = "def fibonacci(n):", {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    with Engine(tp_size=2, tpla_groups=2, kv_cache_bytes=1 << 25) as engine:
        want = engine.generate(prompt, params)["output_ids"]
    log = tmp_path / "all.log"
    small = "--kv-cache-bytes 33554432"
    cmd = [sys.executable, "-m", "tpla_serve.launch", "--role", "all", "--port", "0", "--speculative-algorithm",
           "easyspec", "--prefill-args", small, "--decode-args", small, "--log-level", "warning"]
    proc, url = _start(cmd, log)
    try:
        r = httpx.post(url + "/generate", json={"text": prompt, "sampling_params": params}, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["output_ids"] == want
        meta = out["meta_info"]
        assert 0 < meta["spec_verify_ct"] < 23 and meta["spec_num_correct_drafts"] > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_role_all_restarts_a_server_whose_tp_rank_died_and_keeps_the_key_off_command_lines(
    chat_model_dir: Path, tmp_path: Path
) -> None:
    key = "k3y-only-in-the-environment"
    log = tmp_path / "all.log"
    small = "--kv-cache-bytes 33554432"
    cmd = [sys.executable, "-m", "tpla_serve.launch", "--role", "all", "--port", "0", "--model-path", str(chat_model_dir),
           "--prefill-args", small, "--decode-args", small, "--log-level", "info"]
    proc, url = _start(cmd, log, {"TPLA_API_KEY": key})
    headers = {"Authorization": f"Bearer {key}"}
    body = {"text": "def fibonacci(n):", "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
    try:
        assert httpx.post(url + "/generate", json=body, timeout=120).status_code == 401
        r = httpx.post(url + "/generate", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        tree = descendants(proc.pid)
        assert all(key not in _cmdline(pid) for pid in tree | {proc.pid})

        decode_front = next(pid for pid in tree if "--role decode" in _cmdline(pid))
        scheduler = scheduler_pid(decode_front)
        (rank1,) = [pid for pid in descendants(scheduler) if "spawn_main" in _cmdline(pid)]  # TP rank 1
        os.kill(rank1, signal.SIGKILL)

        deadline = time.monotonic() + 240
        restarted = False
        while time.monotonic() < deadline:
            fronts = [pid for pid in descendants(proc.pid) if "--role decode" in _cmdline(pid)]
            restarted = restarted or (bool(fronts) and fronts != [decode_front])
            if restarted:
                try:
                    r = httpx.post(url + "/generate", json=body, headers=headers, timeout=60)
                except httpx.TransportError:
                    r = None
                if r is not None and r.status_code == 200:
                    break
            time.sleep(1.0)
        assert restarted, "the decode server was not restarted:\n" + log.read_text()[-3000:]
        assert r is not None and r.status_code == 200, "no answer after the restart:\n" + log.read_text()[-3000:]
        assert proc.poll() is None  # the cluster kept running
        text = log.read_text()
        assert "restarting it" in text and "TP rank 1" in text
        assert key not in text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
