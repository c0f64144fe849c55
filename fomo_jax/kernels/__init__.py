"""Attention kernels behind one dispatcher: every model calls `attention`."""

from fomo_jax.kernels.attention import attention, reference_attention
from fomo_jax.kernels.flash import flash_attention

__all__ = ["attention", "flash_attention", "reference_attention"]
