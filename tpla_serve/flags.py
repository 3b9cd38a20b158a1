"""The command-line flags of a server and of the offline tools, named as SGLang names them.

Every flag has a description and shows its default in --help. Abbreviations are off (allow_abbrev=False
wherever a parser is built): `--tp` is SGLang's alias of --tp-size, not a prefix of --tpla-groups.
SGLang options that select features implemented differently here are in tpla_serve.sglang_options.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from tpla_serve.config import (
    API_KEY_ENV,
    ATTENTION_BACKENDS,
    DISAGGREGATION_MODES,
    DISAGGREGATION_SECRET_ENV,
    GRAMMAR_BACKENDS,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    LOG_LEVELS,
    QUANTIZATIONS,
    REASONING_PARSERS,
    SPECULATIVE_ALGORITHMS,
    TOOL_CALL_PARSERS,
    TPLA_NORMS,
    TPLA_TRANSFORMS,
    EngineConfig,
    ServerConfig,
)
from tpla_serve.sglang_options import SGLANG_OPTIONS, check_sglang_options, draft_tokens_per_step


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and ends each flag's help with its default, unless the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or action.required or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _bool(text: str) -> bool:
    """SGLang writes boolean options as bare flags; `--flag true|false` is accepted too."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named as SGLang names them where SGLang has the same knob."""
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    a = g.add_argument
    a("--model-path", "--model", dest="model_path", default=d.model_path,
      help="local model directory (config.json, *.safetensors, tokenizer files); default: the bundled model")
    a("--tokenizer-path", default=None, help="tokenizer directory (default: --model-path)")
    a("--skip-tokenizer-init", action="store_true", help="accept and return token ids only")
    a("--trust-remote-code", action="store_true",
      help="let the tokenizer run code shipped in its directory (transformers' trust_remote_code); the model "
           "itself is always this project's implementation")
    a("--load-format", default=d.load_format, choices=LOAD_FORMATS,
      help="weights from safetensors, or random (dummy) weights for speed runs")
    a("--json-model-override-args", default=d.json_model_override_args,
      help='JSON object replacing config.json keys, e.g. \'{"num_hidden_layers": 4}\'')
    a("--dtype", default=d.dtype,
      help="weights and activations: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32")
    a("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
      help="latent KV cache dtype: auto (the model's) or bfloat16 (then --dtype auto means bfloat16); FP8 "
           "caches are refused")
    a("--quantization", default=None, choices=QUANTIZATIONS,
      help="fp8: require a block-FP8 checkpoint (dequantized at load) and fail otherwise (default: none, the "
           "checkpoint's config.json decides)")
    a("--device", default=d.device, help="auto (cuda when available), cuda or cpu")
    a("--context-length", type=int, default=None,
      help="longest prompt + output in tokens (default: the model's max_position_embeddings)")
    a("--page-size", type=int, default=None, help="tokens per KV page, a power of two (default: 64 on GPU, 16 on CPU)")
    a("--mem-fraction-static", type=float, default=None,
      help=f"GPU: this server's share of the device's memory for its weights and KV cache (default: "
           f"{d.mem_fraction_static}); servers sharing a GPU each take their own; it does not apply on CPU")
    a("--kv-cache-bytes", type=int, default=None,
      help=f"CPU: the KV cache's byte budget per rank (default: {d.kv_cache_bytes}); it does not apply on GPU")
    a("--max-total-tokens", type=int, default=None,
      help="cap on the KV cache's tokens, whatever memory allows (default: no cap)")
    a("--max-running-requests", type=int, default=d.max_running_requests, help="requests decoded at once")
    a("--chunked-prefill-size", type=int, default=d.chunked_prefill_size,
      help="prompt tokens per prefill step; <= 0 prefills a prompt in one step")
    a("--attention-backend", default=d.attention_backend, choices=ATTENTION_BACKENDS,
      help="decode attention kernels: auto (FlashInfer where it serves the shape, else Triton; torch on CPU)")
    a("--random-seed", type=int, default=d.random_seed, help="seed of dummy weights and of requests without one")
    a("--tp-size", "--tp", "--tensor-parallel-size", dest="tp_size", type=int, default=d.tp_size,
      help="tensor-parallel ranks of this server, over all its nodes (tp_size / nnodes processes per node)")
    a("--nnodes", type=int, default=d.nnodes, help="hosts this server's TP ranks span")
    a("--node-rank", type=int, default=d.node_rank,
      help="this host's index among --nnodes: node 0 runs rank 0 and serves HTTP, the others run their ranks "
           "only and exit when node 0 goes")
    a("--dist-init-addr", default=None,
      help="HOST:PORT of node 0 where the nodes' TP ranks meet, e.g. 10.0.0.1:5000 (default: none; needed "
           "with --nnodes > 1)")
    a("--tpla-groups", type=int, default=d.tpla_groups, help="latent groups g (1 = plain MLA-TP)")
    a("--tpla-norm", default=d.tpla_norm, choices=TPLA_NORMS,
      help="RMSNorm of the latent: exact (global) or local (per group's slice, the paper's variant)")
    a("--tpla-transform", default=d.tpla_transform, choices=TPLA_TRANSFORMS,
      help="orthogonal transform of the latent folded into the weights at load")
    a("--tpla-calibration", default=None, help="calibration file (PCA bases, logit scales) (default: none)")
    a("--no-tpla-pd-sep", dest="tpla_pd_sep", action="store_false",
      help="run prompt tokens through TPLA too, for accuracy comparisons (by default they run exact MLA)")
    a("--disaggregation-mode", default=d.disaggregation_mode, choices=DISAGGREGATION_MODES,
      help="null: serve alone; prefill / decode: one side of a PD pair (default: the --role)")
    a("--disaggregation-host", default=d.disaggregation_host,
      help="decode: the address its TP ranks receive KV on (reachable from the prefill servers)")
    a("--disaggregation-timeout", type=float, default=d.disaggregation_timeout,
      help="seconds a PD request may wait for its peer or its KV")
    a("--disaggregation-bootstrap-port", type=int, default=d.disaggregation_bootstrap_port,
      help="prefill: where decode servers register requests; decode: the port of requests that name none")
    a("--disaggregation-secret", default=None,
      help=f"the secret every prefill and decode server of a cluster shares to authenticate KV transfers "
           f"(default: ${DISAGGREGATION_SECRET_ENV}, else --api-key; the variable keeps it out of process listings)")
    a("--disable-cuda-graph", action="store_true", help="GPU: run decode steps eagerly")
    a("--disable-overlap-schedule", action="store_true",
      help="read each decode step's tokens before building the next, instead of while it runs")
    a("--disable-radix-cache", action="store_true",
      help="recompute every prompt instead of reusing the KV of cached prefixes")
    a("--cuda-graph-max-bs", type=int, default=d.cuda_graph_max_bs,
      help="GPU: the largest decode batch captured in a CUDA graph")
    a("--speculative-algorithm", default=d.speculative_algorithm, choices=SPECULATIVE_ALGORITHMS,
      help="decode with a draft model: standard (layer after layer) or easyspec (layer-parallel)")
    a("--speculative-draft-model-path", "--speculative-draft-model", dest="speculative_draft_model_path",
      default=None,
      help="a small model of the same family; on a PD prefill server (with --speculative-algorithm none) the "
           "prefill also runs this draft over every prompt and streams its KV to the decode server, whose "
           "speculative decoding then skips the draft's prefill (default: none)")
    a("--speculative-num-draft-tokens", type=int, default=None,
      help=f"draft tokens proposed per verification step (default: {d.speculative_num_draft_tokens}; with "
           "--speculative-num-steps, SGLang's count: steps + 1)")
    a("--speculative-num-steps", type=int, default=None,
      help="SGLang's name of the drafts proposed per verification step (default: unset)")
    a("--easyspec-group-size", type=int, default=None,
      help="draft attention sublayers run at once: one per TP rank, or batched on one device "
           "(default: min(tp_size, 4); 4 with tp_size 1)")
    a("--grammar-backend", default=d.grammar_backend, choices=GRAMMAR_BACKENDS,
      help="constrained decoding (regex, json_schema, ebnf, response_format); none refuses them")
    _add_sglang_options(g)


def _add_sglang_options(group: argparse._ArgumentGroup) -> None:
    for option in SGLANG_OPTIONS:
        if option.type is bool:
            group.add_argument(option.flag, nargs="?", const=True, default=option.default, type=_bool,
                               help=option.help)
        else:
            group.add_argument(option.flag, type=option.type, default=option.default, help=option.help)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig(EngineConfig())
    g = parser.add_argument_group("server")
    a = g.add_argument
    a("--host", default=d.host, help="address the HTTP API listens on")
    a("--port", type=int, default=d.port, help="port the HTTP API listens on")
    a("--served-model-name", default=None,
      help="the model's id in the OpenAI API, /server_info and metrics (default: the model directory's name)")
    a("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body accepted")
    a("--api-key", default=None,
      help=f"require 'Authorization: Bearer <key>' on every route but /health (or set {API_KEY_ENV}, or give "
           "--api-key-file: a command line is visible to every user of the machine) (default: none)")
    a("--api-key-file", default=None, help="a file holding the API key (default: none)")
    a("--log-level", default=d.log_level, choices=LOG_LEVELS, help="logging level of the server's processes")
    a("--enable-metrics", action="store_true",
      help="also export SGLang's metric names (sglang:*) on /metrics, beside tpla_serve_*")
    a("--chat-template", default=None,
      help="chat template for /v1/chat/completions: a .jinja file, or a built-in name (chatml, deepseek-v3) "
           "(default: the tokenizer's own)")
    a("--skip-server-warmup", action="store_true",
      help="report ready as soon as the model is loaded, without first serving one small request")
    a("--stream-interval", type=int, default=d.stream_interval,
      help="tokens between two chunks of a streamed answer: larger sends fewer, larger chunks")
    a("--watchdog-timeout", type=float, default=d.watchdog_timeout,
      help="seconds one scheduler step may run; a step that takes longer stops the server (its requests "
           "fail with 503, /health fails) instead of letting it hang")
    a("--reasoning-parser", default=None, choices=REASONING_PARSERS,
      help="chat: return the model's reasoning as reasoning_content, apart from content (default: none)")
    a("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
      help="chat: turn the model's tool-call tokens into OpenAI tool_calls (default: none; requests with "
           "tools are refused)")


def resolve_api_key(flag: str | None, path: str | None) -> str | None:
    """The API key from --api-key, else --api-key-file, else the environment (None: no key)."""
    if flag is not None and path is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if path is not None:
        try:
            return Path(path).read_text().strip() or None
        except OSError as e:
            raise ValueError(f"--api-key-file: {e}") from None
    return flag or os.environ.get(API_KEY_ENV) or None


def engine_config_from_cli(args: argparse.Namespace) -> EngineConfig:
    """The engine's config; SGLang options outside its fields are checked here and go no further."""
    values = vars(args)
    check_sglang_options(values)
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    kwargs = {k: v for k, v in values.items() if k in fields and v is not None}
    kwargs["speculative_num_draft_tokens"] = draft_tokens_per_step(
        values.get("speculative_num_steps"), values.get("speculative_num_draft_tokens"),
        EngineConfig.speculative_num_draft_tokens)
    return EngineConfig(**kwargs)


def server_config_from_cli(args: argparse.Namespace) -> ServerConfig:
    """The server's config; its disaggregation secret is the flag's, else the environment's, else the API key."""
    names = {f.name for f in dataclasses.fields(ServerConfig)} - {"engine", "api_key"}
    api_key = resolve_api_key(args.api_key, args.api_key_file)
    engine = engine_config_from_cli(args)
    if engine.disaggregation_secret is None:
        secret = os.environ.get(DISAGGREGATION_SECRET_ENV, api_key)
        engine = dataclasses.replace(engine, disaggregation_secret=secret)
    return ServerConfig(engine=engine, api_key=api_key, **{k: v for k, v in vars(args).items() if k in names})


def inapplicable_flags(args: argparse.Namespace, engine: EngineConfig) -> list[str]:
    """Why flags given on the command line do nothing on the engine's device (logged at start)."""
    given = {name for name in ("mem_fraction_static", "kv_cache_bytes") if getattr(args, name, None) is not None}
    return engine.inapplicable_flags(given)
