"""tpla-serve: disaggregated MLA serving with tensor-parallel latent attention."""
