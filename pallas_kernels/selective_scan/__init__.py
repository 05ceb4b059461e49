"""Selective scan (Mamba-1's S6 recurrence) as a Pallas kernel with a pure-jnp reference."""

from pallas_kernels.selective_scan.ops import selective_scan
from pallas_kernels.selective_scan.reference import selective_scan_chunked, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_ref"]
