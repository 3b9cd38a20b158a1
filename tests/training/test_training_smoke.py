"""The training script's smoke mode: CLI run, saved HF files, falling loss, determinism on CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPECTED_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def test_smoke_run_trains_saves_and_is_deterministic(tmp_path: Path) -> None:
    cli_out = tmp_path / "cli"
    # The in-process run below uses this process's thread count (earlier tests may have lowered it); the
    # CLI run must use the same, or float sums reduce in another order and the weights differ in the last bit.
    threads = str(torch.get_num_threads())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--smoke", "--out", str(cli_out)],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"step \d+/\d+ loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 6
    assert losses[-1] < losses[0]
    assert EXPECTED_FILES <= {p.name for p in cli_out.iterdir()}

    config = json.loads((cli_out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["kv_lora_rank"] >= 128 and config["q_lora_rank"] is not None
    assert 1 <= config["first_k_dense_replace"] < config["num_hidden_layers"]
    assert (config["scoring_func"], config["topk_method"]) == ("sigmoid", "noaux_tc")

    model = AutoModelForCausalLM.from_pretrained(str(cli_out), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(cli_out))
    logits = model(**tokenizer("def f(x):\n    return x", return_tensors="pt")).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()

    in_process_out = tmp_path / "in_process"
    assert main(["--smoke", "--out", str(in_process_out)]) == 0
    first, second = (
        load_file(str(cli_out / "model.safetensors")),
        load_file(str(in_process_out / "model.safetensors")),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (cli_out / "tokenizer.json").read_bytes() == (in_process_out / "tokenizer.json").read_bytes()
