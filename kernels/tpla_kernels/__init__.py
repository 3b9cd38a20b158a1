"""Decode attention kernels for MLA and TPLA (Triton) and their torch references."""
