"""Flash attention as a Pallas kernel: ``reference`` (the jnp oracle), ``kernel`` (Pallas forward
and backward), ``ops`` (the public ``flash_attention`` with ``custom_vjp`` and the impl switch)."""

from pallas_kernels.flash_attention.ops import flash_attention
from pallas_kernels.flash_attention.reference import attention_reference

__all__ = ["attention_reference", "flash_attention"]
