"""The one ``impl="auto"`` policy of every kernel in :mod:`pallas_kernels`.

``impl="auto"`` runs a kernel compiled only on a platform where its compiled tests (kernel ≡
reference, values and gradients, ``interpret=False``: ``pytest -m gpu`` on a GPU, the compiled
cases on a TPU) have passed on real hardware; everywhere else it runs the XLA path (the kernel's
pure-jnp reference). Interpret mode and lowering checks (``jax.export(..., platforms=[...])``) do
not count: they never ran the compiled kernel.

:data:`VALIDATED` is the record of where those tests passed. Add an entry — platform, the jax
version and the date — in the commit that reports such a run. Today it is empty for every kernel:
no compiled test has run on a GPU or TPU yet.
"""

from __future__ import annotations

import jax

KERNELS = ("flash_attention", "selective_scan", "grouped_matmul")
PLATFORMS = ("cpu", "gpu", "tpu")

#: kernel → platform (``jax.default_backend()``'s name: "gpu" or "tpu") → ``(jax version, date)``
#: of the run whose compiled tests passed there, e.g. ``{"gpu": ("0.10.2", "2026-11-20")}``.
VALIDATED: dict[str, dict[str, tuple[str, str]]] = {
    "flash_attention": {},
    "selective_scan": {},
    "grouped_matmul": {},
}


def validated(kernel: str, platform: str) -> bool:
    """Whether ``kernel``'s compiled tests have passed on ``platform``."""
    if kernel not in VALIDATED:
        raise ValueError(f"kernel must be one of {tuple(VALIDATED)} (got {kernel!r})")
    return platform in VALIDATED[kernel]


def resolve(kernel: str, impl: str, platform: str | None = None) -> str:
    """``"pallas"`` or ``"xla"`` for ``impl`` (``"auto" | "pallas" | "xla"``) on ``platform``
    (default: ``jax.default_backend()``): ``"auto"`` is the kernel only where :func:`validated`."""
    if impl not in ("auto", "pallas", "xla"):
        raise ValueError(f"impl: must be one of ('auto', 'pallas', 'xla') (got {impl!r})")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    return "pallas" if validated(kernel, platform) else "xla"
