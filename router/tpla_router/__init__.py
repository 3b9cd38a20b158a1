"""PD-aware router for tpla-serve prefill/decode servers."""
