"""The engine's one configuration object, and the command-line flags that build it (SGLang's names)."""

from __future__ import annotations

import dataclasses
import json
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
# The KV cache is kept in the model's dtype: "bfloat16" asks for a bfloat16 cache, so a bfloat16 model.
KV_CACHE_DTYPES = ("auto", "bfloat16", "bf16")
QUANTIZATIONS = ("fp8",)  # block-FP8 checkpoints (DeepSeek-V3, Kimi-K2), dequantized at load
REASONING_PARSERS = ("deepseek-r1",)
TOOL_CALL_PARSERS = ("deepseekv3",)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
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


def parse_host_port(text: str, flag: str) -> tuple[str, int]:
    """HOST:PORT as (host, port): `10.0.0.1:5000`, `node0:5000` or `[fd00::1]:5000`."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} must be HOST:PORT with a port in 1..65535, got {text!r}")
    return host, int(port)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    model_path: str = DEFAULT_MODEL_PATH
    tokenizer_path: str | None = None
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False  # let the tokenizer run code from its directory (transformers' flag)
    load_format: str = "auto"  # auto | safetensors | dummy
    json_model_override_args: str = "{}"  # JSON object replacing config.json keys, e.g. '{"num_hidden_layers": 4}'
    dtype: str = "auto"  # auto: bf16 on GPU (and for a bf16 KV cache), fp32 on CPU
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; bfloat16 needs a bfloat16 model
    quantization: str | None = None  # None: as config.json says; fp8: require a block-FP8 checkpoint
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
    nnodes: int = 1  # hosts one server's TP ranks span; tp_size / nnodes ranks on each
    node_rank: int = 0  # this host's index among them; node 0 runs rank 0 and serves HTTP
    dist_init_addr: str | None = None  # host:port on node 0 where the nodes' ranks meet (nnodes > 1)
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
    easyspec_group_size: int | None = None  # N: draft attention sublayers at once (min(T, 4); 4 on one GPU)
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
        self._check_kv_cache_dtype()
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"--quantization {self.quantization}: not supported; tpla-serve loads unquantized and block-FP8 "
                "checkpoints (--quantization fp8, or no flag: the checkpoint's config.json decides)"
            )
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
        self._check_nodes()
        if self.easyspec_group_size is not None:
            if self.easyspec_group_size < 1:
                raise ValueError(f"easyspec_group_size must be >= 1, got {self.easyspec_group_size}")
            if self.tp_size > 1 and self.easyspec_group_size > self.tp_size:
                raise ValueError(
                    f"easyspec_group_size must be in [1, tp_size={self.tp_size}] (one attention sublayer per "
                    f"rank), got {self.easyspec_group_size}"
                )

    def _check_nodes(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, --nnodes {self.nnodes}), got {self.node_rank}")
        if self.tp_size % self.nnodes:
            raise ValueError(f"--tp-size {self.tp_size} must be a multiple of --nnodes {self.nnodes}: every "
                             "node runs the same number of TP ranks")
        if self.nnodes > 1:
            if self.dist_init_addr is None:
                raise ValueError(f"--nnodes {self.nnodes} needs --dist-init-addr HOST:PORT, an address of node "
                                 "0 that every node reaches (where their TP ranks meet)")
            parse_host_port(self.dist_init_addr, "--dist-init-addr")

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    @property
    def node_ranks(self) -> range:
        """The TP ranks this node runs (node n: ranks n·T/N … (n+1)·T/N − 1)."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    @property
    def dist_init_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.dist_init_addr or "", "--dist-init-addr")

    def _check_kv_cache_dtype(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"--kv-cache-dtype {self.kv_cache_dtype}: not supported; the latent KV cache is kept in the "
                "model's dtype here (--kv-cache-dtype auto), or in bfloat16 (--kv-cache-dtype bfloat16)"
            )
        if self.kv_cache_dtype != "auto" and self.dtype != "auto" and _DTYPES[self.dtype] != torch.bfloat16:
            raise ValueError(
                f"--kv-cache-dtype {self.kv_cache_dtype} with --dtype {self.dtype}: the KV cache is kept in the "
                "model's dtype, so a bfloat16 cache needs --dtype bfloat16 (or auto)"
            )

    def inapplicable_flags(self, given: set[str]) -> list[str]:
        """Why flags among `given` (field names set explicitly) do nothing on this engine's device."""
        notes = []
        on_gpu = self.torch_device.type == "cuda"
        if "mem_fraction_static" in given and not on_gpu:
            notes.append("--mem-fraction-static applies to GPUs, not to this CPU engine: its KV cache is sized "
                         f"by --kv-cache-bytes ({self.kv_cache_bytes} bytes per rank)")
        if "kv_cache_bytes" in given and on_gpu:
            notes.append("--kv-cache-bytes applies to CPU engines, not to this GPU engine: its KV cache is sized "
                         f"by --mem-fraction-static ({self.mem_fraction_static})")
        return notes

    @property
    def speculative(self) -> bool:
        return self.speculative_algorithm != "none"

    @property
    def resolved_easyspec_group_size(self) -> int:
        """N: draft attention sublayers run at once, one per rank across T > 1 ranks, batched on one device
        (1 = sequential drafting)."""
        if self.speculative_algorithm != "easyspec":
            return 1
        return self.easyspec_group_size or (min(self.tp_size, 4) if self.tp_size > 1 else 4)

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
            bf16 = self.torch_device.type == "cuda" or self.kv_cache_dtype != "auto"
            return torch.bfloat16 if bf16 else torch.float32
        return _DTYPES[self.dtype]

    @property
    def resolved_page_size(self) -> int:
        if self.page_size is not None:
            return self.page_size
        return 64 if self.torch_device.type == "cuda" else 16

    @property
    def resolved_tokenizer_path(self) -> str:
        return self.tokenizer_path or self.model_path


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
    enable_metrics: bool = False  # SGLang's metric names (sglang:*) beside ours on /metrics
    chat_template: str | None = None  # a .jinja file or a built-in name; None: the tokenizer's own
    skip_server_warmup: bool = False  # report ready without first serving one tiny request
    watchdog_timeout: float = 300.0  # seconds a scheduler step may take before the server stops
    stream_interval: int = 1  # tokens between two chunks of a streamed answer (SGLang's --stream-interval)
    reasoning_parser: str | None = None  # deepseek-r1: reasoning_content apart from content
    tool_call_parser: str | None = None  # deepseekv3: OpenAI tool_calls from DeepSeek's tool tokens

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"a server's role is prefill or decode, got {self.role!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be >= 1 token, got {self.stream_interval}")
        if not self.watchdog_timeout > 0:
            raise ValueError(f"--watchdog-timeout must be > 0 seconds, got {self.watchdog_timeout}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"--reasoning-parser {self.reasoning_parser}: not supported here; "
                             f"available: {', '.join(REASONING_PARSERS)}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"--tool-call-parser {self.tool_call_parser}: not supported here; "
                             f"available: {', '.join(TOOL_CALL_PARSERS)}")

    @property
    def model_name(self) -> str:
        """The model's id in the OpenAI API, /server_info and the metrics' model_name label."""
        return self.served_model_name or Path(self.engine.model_path).name

    @property
    def engine_type(self) -> str:
        """SGLang's engine_type metric label: prefill, decode, or unified (a server that pairs with none)."""
        mode = self.engine.disaggregation_mode
        return mode if mode in ("prefill", "decode") else "unified"


