"""Attention kernels behind one dispatcher: every model calls `attention`."""

from fomo_jax.kernels.attention import attention, reference_attention

__all__ = ["attention", "reference_attention"]
