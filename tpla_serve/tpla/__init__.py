"""Tensor-parallel latent attention: shard layout, weight transforms, calibration."""
