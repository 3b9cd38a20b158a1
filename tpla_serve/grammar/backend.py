"""Compiling requests' grammars with xgrammar (SGLang's default grammar backend), cached per server.

Compiling builds the grammar's token-mask tables over the whole vocabulary, which costs far more than
matching, and clients reuse constraints (a frontend's dtype=int regex, an API's response schema): the
backend keeps the most recently used compiled grammars (an LRU of `cache_size` entries), and each request
gets its own matcher over a shared compiled grammar. The grammar's stop tokens are the model's EOS ids, so
a complete output ends the way the model ends any other.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from tpla_serve.grammar.matcher import RequestGrammar
from tpla_serve.sampling.params import SamplingParams

if TYPE_CHECKING:
    import xgrammar as xgr

ANY_JSON = "$$ANY$$"  # json_schema meaning "any JSON value" (SGLang's)
DEFAULT_CACHE_SIZE = 256
GrammarKey = tuple[str, str]  # (field, source): ("regex", r"\d+"), ("json_schema", '{"type": ...}'), ...

# xgrammar's messages start with a timestamp and a C++ source location, and assertion failures with the
# failed check; what follows is the problem itself.
_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class GrammarError(ValueError):
    """A request's grammar cannot be served; the message names the field and the problem (a 400)."""


def _reason(exc: RuntimeError) -> str:
    return _NOISE.sub("", str(exc).strip())


class GrammarBackend:
    """One per server, owned by its scheduler: the vocabulary as xgrammar sees it, a compiler, the cache."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Collection[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        import xgrammar as xgr  # imported here: --grammar-backend none needs no xgrammar

        self._matcher_type = xgr.GrammarMatcher
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(int(t) for t in eos_token_ids) or None
        )
        # xgrammar's own cache is off: ours is bounded by entries and says what it holds.
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._cache: OrderedDict[GrammarKey, xgr.CompiledGrammar] = OrderedDict()
        self.cache_size = cache_size
        self.vocab_size = vocab_size
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def compile(self, key: GrammarKey) -> xgr.CompiledGrammar:
        """The compiled grammar of (field, source), from the cache if it is there; GrammarError if invalid."""
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return compiled
        compiled = self._compile(*key)
        self.misses += 1
        self._cache[key] = compiled
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return compiled

    def _compile(self, field: str, source: str) -> xgr.CompiledGrammar:
        compiler = self._compiler
        try:
            if field == "regex":
                return compiler.compile_regex(source)
            if field == "ebnf":
                return compiler.compile_grammar(source)
            if field != "json_schema":
                raise ValueError(f"not a grammar field: {field!r}")
            if source == ANY_JSON:
                return compiler.compile_builtin_json_grammar()
            try:
                json.loads(source)
            except json.JSONDecodeError as e:
                raise GrammarError(f"json_schema: not valid JSON: {e}") from None
            return compiler.compile_json_schema(source, any_whitespace=True)  # SGLang's default
        except RuntimeError as e:  # how xgrammar reports a grammar it cannot parse or convert
            raise GrammarError(f"{field}: {_reason(e)}") from None

    def matcher(self, params: SamplingParams) -> RequestGrammar | None:
        """A fresh matcher for the request's grammar; None when the request has none."""
        key = params.grammar
        if key is None:
            return None
        return RequestGrammar(self._matcher_type(self.compile(key)), key[0])


def request_grammar(backend: GrammarBackend | None, params: SamplingParams) -> RequestGrammar | None:
    """The request's matcher on a server with `backend` (None: constrained decoding is off there)."""
    key = params.grammar
    if key is None:
        return None
    if backend is None:
        raise GrammarError(
            f"{key[0]}: constrained decoding is off on this server (--grammar-backend none, or no tokenizer: "
            "--skip-tokenizer-init)"
        )
    return backend.matcher(params)
