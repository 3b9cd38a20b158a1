"""SGLang launch lines: every SGLang flag parses, takes effect or fails at start naming the flag and what to
use instead; --help describes each flag with its default; abbreviations are off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tpla_serve import launch
from tpla_serve.config import DEFAULT_MODEL_PATH
from tpla_serve.entrypoints.checkpoint import check_checkpoint
from tpla_serve.flags import inapplicable_flags, server_config_from_cli
from tpla_serve.server import local_cluster

# An SGLang launch line for a DeepSeek PD decode server, with the flags the issue lists.
SGLANG_LINE = [
    "--role", "decode", "--model-path", DEFAULT_MODEL_PATH, "--trust-remote-code", "--enable-metrics", "--tp", "2",
    "--kv-cache-dtype", "bfloat16", "--chat-template", "chatml", "--skip-server-warmup", "--watchdog-timeout", "30",
    "--dp-size", "1", "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "zmq",
    "--speculative-algorithm", "standard", "--speculative-draft-model-path", DEFAULT_MODEL_PATH,
    "--speculative-num-steps", "3", "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4",
    "--nnodes", "1", "--node-rank", "0", "--served-model-name", "deepseek", "--reasoning-parser", "deepseek-r1",
    "--tool-call-parser", "deepseekv3",
]


def parse(argv: list[str]):
    args = launch.server_parser().parse_args(argv)
    return args, server_config_from_cli(args)


def launch_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What `python -m tpla_serve.launch` says when it refuses a line (exit code 2, nothing started)."""
    with pytest.raises(SystemExit) as exc:
        launch.main(["--role", "decode", "--model-path", DEFAULT_MODEL_PATH, *argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_an_sglang_launch_line_parses_and_takes_effect() -> None:
    _, config = parse(SGLANG_LINE)
    engine = config.engine
    assert engine.tp_size == 2 and engine.trust_remote_code and engine.torch_dtype == torch.bfloat16
    assert engine.speculative_num_draft_tokens == 3  # SGLang's steps; its 4 tokens count the verified one
    assert config.enable_metrics and config.skip_server_warmup and config.watchdog_timeout == 30.0
    assert config.chat_template == "chatml" and config.model_name == "deepseek"
    assert (config.reasoning_parser, config.tool_call_parser) == ("deepseek-r1", "deepseekv3")
    assert parse(["--role", "decode", "--tensor-parallel-size", "4"])[1].engine.tp_size == 4


@pytest.mark.parametrize(("argv", "said"), [
    (["--dp-size", "2"], ["--dp-size 2", "--role router"]),
    (["--enable-dp-attention"], ["--enable-dp-attention", "--tpla-groups"]),
    (["--nnodes", "2", "--tp-size", "2"], ["--nnodes 2", "--dist-init-addr HOST:PORT"]),
    (["--node-rank", "1"], ["--node-rank", "--nnodes 1", "got 1"]),
    (["--nnodes", "2", "--tp-size", "3", "--dist-init-addr", "10.0.0.1:5000"], ["--tp-size 3", "--nnodes 2"]),
    (["--nnodes", "2", "--tp-size", "2", "--dist-init-addr", "10.0.0.1"], ["--dist-init-addr", "HOST:PORT"]),
    (["--disaggregation-transfer-backend", "mooncake"], ["--disaggregation-transfer-backend mooncake", "zmq"]),
    (["--speculative-eagle-topk", "8"], ["--speculative-eagle-topk 8", "--speculative-eagle-topk 1"]),
    (["--speculative-num-steps", "3", "--speculative-num-draft-tokens", "3"],
     ["--speculative-num-steps 3", "steps + 1"]),
    (["--kv-cache-dtype", "fp8_e5m2"], ["--kv-cache-dtype", "bfloat16"]),
    (["--kv-cache-dtype", "bfloat16", "--dtype", "float16"], ["--kv-cache-dtype bfloat16", "--dtype bfloat16"]),
    (["--quantization", "awq"], ["--quantization", "fp8"]),
    (["--quantization", "fp8"], ["--quantization fp8", "not a block-FP8 checkpoint"]),
    (["--chat-template", "/no/such/template.jinja"], ["--chat-template /no/such/template.jinja", "chatml"]),
    (["--chat-template", "chatml", "--skip-tokenizer-init"], ["--chat-template", "no tokenizer"]),
    (["--reasoning-parser", "qwen3"], ["--reasoning-parser", "deepseek-r1"]),
    (["--tool-call-parser", "llama3"], ["--tool-call-parser", "deepseekv3"]),
    (["--watchdog-timeout", "0"], ["--watchdog-timeout"]),
    (["--tp-si", "2"], ["unrecognized arguments: --tp-si"]),  # no abbreviations
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_an_unsupported_flag_fails_at_start_naming_it(argv: list[str], said: list[str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    err = launch_error(argv, capsys)
    for fragment in said:
        assert fragment in err, err


def test_help_describes_every_flag_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        launch.main(["--role", "decode", "--help"])
    assert exc.value.code == 0
    blocks: dict[str, str] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        elif line.startswith("      ") and blocks:
            blocks[name] += " " + line.strip()
    for flag in ("--tp-size", "--trust-remote-code", "--enable-metrics", "--kv-cache-dtype", "--quantization",
                 "--chat-template", "--skip-server-warmup", "--watchdog-timeout", "--dp-size", "--nnodes",
                 "--dist-init-addr", "--speculative-num-steps", "--disaggregation-transfer-backend"):
        assert flag in blocks, flag
    for name, text in blocks.items():
        if name in ("-h", "--role"):
            continue
        flag_text = text.split(None, 1)[1] if " " in text else ""
        assert "default" in flag_text, f"{name} shows no default: {text}"
        assert len(flag_text.replace("(default:", "").split()) > 3, f"{name} has no description: {text}"


def test_mem_fraction_static_on_cpu_says_it_does_not_apply() -> None:
    args, config = parse(["--role", "decode", "--device", "cpu", "--mem-fraction-static", "0.8"])
    notes = inapplicable_flags(args, config.engine)
    assert len(notes) == 1 and "--mem-fraction-static" in notes[0] and "--kv-cache-bytes" in notes[0]
    args, config = parse(["--role", "decode", "--device", "cpu"])
    assert inapplicable_flags(args, config.engine) == []


def test_quantization_fp8_selects_a_block_fp8_checkpoint(tmp_path: Path) -> None:
    model = tmp_path / "fp8-model"
    model.mkdir()
    raw = json.loads((Path(DEFAULT_MODEL_PATH) / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (model / "config.json").write_text(json.dumps(raw))
    check_checkpoint(parse(["--role", "decode", "--model-path", str(model), "--quantization", "fp8"])[1].engine)
    shutil.copy(Path(DEFAULT_MODEL_PATH) / "config.json", model / "config.json")
    with pytest.raises(ValueError, match="not a block-FP8 checkpoint"):
        check_checkpoint(parse(["--role", "decode", "--model-path", str(model), "--quantization", "fp8"])[1].engine)


def test_other_parsers_take_no_abbreviations(capsys: pytest.CaptureFixture[str]) -> None:
    from tpla_router.cli import main as router_main

    with pytest.raises(SystemExit):
        local_cluster.build_parser().parse_args(["--role", "all", "--decode-tp", "2"])
    assert "unrecognized arguments: --decode-tp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        router_main(["--pd-disaggregation", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2",
                     "--pol", "random"])
    assert "unrecognized arguments: --pol" in capsys.readouterr().err
