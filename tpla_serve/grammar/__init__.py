"""Constrained decoding (SGLang's regex / json_schema / ebnf): grammars compiled by xgrammar, one matcher per
request, token bitmasks for the sampler (DESIGN §7)."""
