"""The engine's one configuration object, and the command-line flags that build it (SGLang's names)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The project's own small trained model, the default everywhere a model is not named.
DEFAULT_MODEL_PATH = str(Path(__file__).resolve().parents[1] / "models" / "mla-tiny")

# The choices of each option, named once: the loader, the transforms and the backend registry check against
# these too.
LOAD_FORMATS = ("auto", "safetensors", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer")
TPLA_NORMS = ("exact", "local")
TPLA_TRANSFORMS = ("none", "hadamard", "pca")
DISAGGREGATION_MODES = ("null", "prefill", "decode")
SPECULATIVE_ALGORITHMS = ("none", "standard", "easyspec")
GRAMMAR_BACKENDS = ("xgrammar", "none")
# Where a server reads its disaggregation secret when --disaggregation-secret is not given.
DISAGGREGATION_SECRET_ENV = "TPLA_DISAGGREGATION_SECRET"

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def public_fields(config: object) -> dict:
    """A config's fields as a dict, without those kept out of its repr (secrets)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.repr}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    model_path: str = DEFAULT_MODEL_PATH
    tokenizer_path: str | None = None
    skip_tokenizer_init: bool = False
    load_format: str = "auto"  # auto | safetensors | dummy
    json_model_override_args: str = "{}"  # JSON object replacing config.json keys, e.g. '{"num_hidden_layers": 4}'
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto: cuda when available
    context_length: int | None = None
    page_size: int | None = None  # auto: 64 on GPU, 16 on CPU
    mem_fraction_static: float = 0.85  # GPU: share of total memory for weights + KV cache
    kv_cache_bytes: int = 1 << 30  # CPU: byte budget of the KV cache (per rank)
    max_total_tokens: int | None = None  # cap on KV tokens, whatever memory allows
    max_running_requests: int = 256
    chunked_prefill_size: int = 4096  # <= 0 disables chunking
    attention_backend: str = "auto"
    random_seed: int = 0
    tp_size: int = 1
    tpla_groups: int = 1
    tpla_norm: str = "exact"
    tpla_transform: str = "none"
    tpla_calibration: str | None = None
    tpla_pd_sep: bool = True  # False runs prompt tokens through TPLA too (the paper's ablation)
    disaggregation_mode: str = "null"  # null: plain server; prefill / decode: one side of a PD pair
    disaggregation_host: str = "127.0.0.1"  # decode: where each rank binds its KV receiving socket
    disaggregation_timeout: float = 60.0  # seconds a room may wait for its peer or its KV
    disaggregation_bootstrap_port: int = 8998  # prefill: where decodes REGISTER; decode: default for null ports
    disaggregation_secret: str | None = field(default=None, repr=False)  # authenticates KV peers; never logged
    disable_cuda_graph: bool = False  # GPU: run decode steps eagerly instead of replaying captured graphs
    disable_overlap_schedule: bool = False  # read each decode step's tokens before building the next
    disable_radix_cache: bool = False  # recompute every prompt instead of reusing cached prefixes
    cuda_graph_max_bs: int = 256  # GPU: the largest decode batch captured in a CUDA graph
    speculative_algorithm: str = "none"  # none | standard | easyspec
    speculative_draft_model_path: str | None = None
    speculative_num_draft_tokens: int = 4  # k: draft tokens proposed per verification step
    easyspec_group_size: int | None = None  # N: draft layers run at once across ranks (default min(T, 4))
    grammar_backend: str = "xgrammar"  # compiles regex / json_schema / ebnf constraints; none refuses them

    def __post_init__(self) -> None:
        try:
            overrides = json.loads(self.json_model_override_args)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_model_override_args is not valid JSON: {e}") from e
        if not isinstance(overrides, dict):
            raise ValueError("json_model_override_args must be a JSON object")
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.page_size is not None and (self.page_size < 1 or self.page_size & (self.page_size - 1)):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        _check_choice("tpla_norm", self.tpla_norm, TPLA_NORMS)
        _check_choice("disaggregation_mode", self.disaggregation_mode, DISAGGREGATION_MODES)
        if self.disaggregation_mode == "prefill" and self.tpla_groups != 1:
            raise ValueError("a prefill server runs exact MLA: --tpla-groups must be 1 with --disaggregation-mode prefill")
        if not 0 < self.disaggregation_bootstrap_port < 65536:
            raise ValueError(f"disaggregation_bootstrap_port must be in 1..65535, got {self.disaggregation_bootstrap_port}")
        if self.disaggregation_secret is not None and not self.disaggregation_secret:
            raise ValueError("disaggregation_secret must not be empty")
        _check_choice("tpla_transform", self.tpla_transform, TPLA_TRANSFORMS)
        if self.cuda_graph_max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be >= 1, got {self.cuda_graph_max_bs}")
        _check_choice("speculative_algorithm", self.speculative_algorithm, SPECULATIVE_ALGORITHMS)
        _check_choice("grammar_backend", self.grammar_backend, GRAMMAR_BACKENDS)
        if self.speculative_algorithm != "none":
            if self.speculative_draft_model_path is None:
                raise ValueError(f"--speculative-algorithm {self.speculative_algorithm} needs --speculative-draft-model-path")
            if self.speculative_num_draft_tokens < 1:
                raise ValueError(f"speculative_num_draft_tokens must be >= 1, got {self.speculative_num_draft_tokens}")
            if self.disaggregation_mode == "prefill":
                raise ValueError(
                    "speculative decoding runs on the decode server, not with --disaggregation-mode prefill "
                    "(a prefill given --speculative-draft-model-path alone prefills that draft for its decodes)"
                )
        if self.easyspec_group_size is not None and not 1 <= self.easyspec_group_size <= self.tp_size:
            raise ValueError(
                f"easyspec_group_size must be in [1, tp_size={self.tp_size}], got {self.easyspec_group_size}"
            )

    @property
    def speculative(self) -> bool:
        return self.speculative_algorithm != "none"

    @property
    def resolved_easyspec_group_size(self) -> int:
        """N: draft attention sublayers run at once, one per rank (1 = sequential drafting)."""
        if self.speculative_algorithm != "easyspec":
            return 1
        return self.easyspec_group_size or min(self.tp_size, 4)

    @property
    def model_overrides(self) -> dict:
        return json.loads(self.json_model_override_args)

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]

    @property
    def resolved_page_size(self) -> int:
        if self.page_size is not None:
            return self.page_size
        return 64 if self.torch_device.type == "cuda" else 16

    @property
    def resolved_tokenizer_path(self) -> str:
        return self.tokenizer_path or self.model_path

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named as SGLang names them where SGLang has the same knob."""
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument("--model-path", default=d.model_path, help="local model directory (default: the bundled model)")
    g.add_argument("--tokenizer-path", default=None)
    g.add_argument("--skip-tokenizer-init", action="store_true", help="accept and return token ids only")
    g.add_argument("--load-format", default=d.load_format, choices=LOAD_FORMATS)
    g.add_argument("--json-model-override-args", default=d.json_model_override_args,
                   help='JSON object replacing config.json keys, e.g. \'{"num_hidden_layers": 4}\'')
    g.add_argument("--dtype", default=d.dtype)
    g.add_argument("--device", default=d.device)
    g.add_argument("--context-length", type=int, default=None)
    g.add_argument("--page-size", type=int, default=None)
    g.add_argument("--mem-fraction-static", type=float, default=d.mem_fraction_static)
    g.add_argument("--kv-cache-bytes", type=int, default=d.kv_cache_bytes, help="KV cache budget on CPU")
    g.add_argument("--max-total-tokens", type=int, default=None)
    g.add_argument("--max-running-requests", type=int, default=d.max_running_requests)
    g.add_argument("--chunked-prefill-size", type=int, default=d.chunked_prefill_size)
    g.add_argument("--attention-backend", default=d.attention_backend,
                   choices=ATTENTION_BACKENDS)
    g.add_argument("--random-seed", type=int, default=d.random_seed)
    g.add_argument("--tp-size", type=int, default=d.tp_size)
    g.add_argument("--tpla-groups", type=int, default=d.tpla_groups, help="latent groups g (1 = plain MLA-TP)")
    g.add_argument("--tpla-norm", default=d.tpla_norm, choices=TPLA_NORMS)
    g.add_argument("--tpla-transform", default=d.tpla_transform, choices=TPLA_TRANSFORMS)
    g.add_argument("--tpla-calibration", default=None, help="calibration file (PCA bases, logit scales)")
    g.add_argument("--disaggregation-mode", default=d.disaggregation_mode, choices=DISAGGREGATION_MODES)
    g.add_argument("--disaggregation-host", default=d.disaggregation_host,
                   help="decode: the address its TP ranks receive KV on (reachable from the prefill servers)")
    g.add_argument("--disaggregation-timeout", type=float, default=d.disaggregation_timeout)
    g.add_argument("--disaggregation-bootstrap-port", type=int, default=d.disaggregation_bootstrap_port)
    g.add_argument("--disaggregation-secret", default=None,
                   help=f"PD: the secret every prefill and decode server of a cluster shares to authenticate KV "
                        f"transfers (default: ${DISAGGREGATION_SECRET_ENV}, else --api-key; the variable keeps it "
                        f"out of process listings)")
    g.add_argument(
        "--no-tpla-pd-sep", dest="tpla_pd_sep", action="store_false",
        help="run prompt tokens through TPLA too instead of exact MLA (for accuracy comparisons)",
    )
    g.add_argument("--disable-cuda-graph", action="store_true", help="GPU: run decode steps eagerly")
    g.add_argument("--disable-radix-cache", action="store_true",
                   help="recompute every prompt instead of reusing the KV of cached prefixes")
    g.add_argument("--disable-overlap-schedule", action="store_true",
                   help="read each decode step's tokens before building the next, instead of while it runs")
    g.add_argument("--cuda-graph-max-bs", type=int, default=d.cuda_graph_max_bs)
    g.add_argument("--speculative-algorithm", default=d.speculative_algorithm,
                   choices=SPECULATIVE_ALGORITHMS,
                   help="decode with a draft model: standard (layer after layer) or easyspec (layer-parallel)")
    g.add_argument("--speculative-draft-model-path", default=None,
                   help="a small model of the same family; on a PD prefill server (with --speculative-algorithm "
                        "none) the prefill also runs this draft over every prompt and streams its KV to the "
                        "decode server, whose speculative decoding then skips the draft's prefill")
    g.add_argument("--speculative-num-draft-tokens", type=int, default=d.speculative_num_draft_tokens)
    g.add_argument("--easyspec-group-size", type=int, default=None,
                   help="draft layers run at once across TP ranks (default min(tp_size, 4))")
    g.add_argument("--grammar-backend", default=d.grammar_backend, choices=GRAMMAR_BACKENDS,
                   help="constrained decoding (regex, json_schema, ebnf, response_format); none refuses them")


ROLES = ("prefill", "decode", "router", "all")
API_KEY_ENV = "TPLA_API_KEY"  # the API key, for servers started without it on their command line


@dataclass(frozen=True)
class ServerConfig:
    """A prefill or decode server: the engine it runs plus how it listens and pairs (SGLang's flag names)."""

    engine: EngineConfig
    role: str = "decode"  # prefill | decode (the engine's disaggregation_mode says whether it pairs)
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str | None = None
    max_body_bytes: int = 32 << 20
    api_key: str | None = field(default=None, repr=False)  # never logged
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"a server's role is prefill or decode, got {self.role!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.engine.model_path).name


def add_server_args(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig(EngineConfig())
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host)
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument("--served-model-name", default=None)
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer <key>' on every route but /health (or set {API_KEY_ENV}, "
                        "or give --api-key-file: a command line is visible to every user of the machine)")
    g.add_argument("--api-key-file", default=None, help="a file holding the API key")
    g.add_argument("--log-level", default=d.log_level)


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


def server_config_from_cli(args: argparse.Namespace) -> ServerConfig:
    """The server's config; its disaggregation secret is the flag's, else the environment's, else the API key."""
    names = {f.name for f in dataclasses.fields(ServerConfig)} - {"engine", "api_key"}
    api_key = resolve_api_key(args.api_key, args.api_key_file)
    engine = EngineConfig.from_cli(args)
    if engine.disaggregation_secret is None:
        secret = os.environ.get(DISAGGREGATION_SECRET_ENV, api_key)
        engine = dataclasses.replace(engine, disaggregation_secret=secret)
    return ServerConfig(engine=engine, api_key=api_key, **{k: v for k, v in vars(args).items() if k in names})
