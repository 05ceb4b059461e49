"""``grouped_matmul``: the public op — impl switch, tile defaults, padding, custom_vjp.

Semantics are those of ``jax.lax.ragged_dot`` (and of
:func:`pallas_kernels.grouped_matmul.reference.gmm_reference`); the kernels are described in
:mod:`pallas_kernels.grouped_matmul.kernel`.

Backward (``custom_vjp``): ``d_lhs = gmm(d_out_MN, rhs_EKN transposed)`` — the forward kernel with
the weight tile read as ``[N, K]``, no transposed copy of ``rhs`` — and ``d_rhs = tgmm(lhs_MK,
d_out_MN)``, per group ``lhsᵀ · d_out`` into ``[E, K, N]``. Both reuse the forward's group metadata.
``group_sizes`` gets no gradient (integers).

``impl="auto"`` follows the policy of every kernel here (:mod:`pallas_kernels._policy`): the XLA
path (``ragged_dot``) until the kernel's compiled tests have passed on the platform, recorded in
``pallas_kernels._policy.VALIDATED["grouped_matmul"]`` — no record today (the kernels have run in
interpret mode and lowered for "cuda" (Triton) and "tpu", never compiled on either), so ``auto`` is
XLA everywhere. ``impl="pallas"`` always runs the kernel.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import _policy
from pallas_kernels.grouped_matmul import kernel

Array = jax.Array
KERNEL = "grouped_matmul"
IMPLS = ("auto", "pallas", "xla")
PLATFORMS = ("gpu", "tpu")

#: Default tiles ``(block_m, block_k, block_n)`` by where the kernels run. Starting points, not
#: tuned (no GPU or TPU has run them): GPU — a 64-row tile halves the work wasted on tiles shared by
#: two groups (at most E - 1 extra tile products) against 128, with a 64 × 128 float32 accumulator
#: per 4-warp program; TPU — 128 rows (the MXU's height) and 512-wide K/N tiles to amortize the
#: fixed cost of a grid step, ~2-4 MB of VMEM with double buffering; CPU (interpret mode) — large
#: tiles, fewer interpreted steps.
DEFAULT_TILES: dict[str, tuple[int, int, int]] = {
    "gpu": (64, 64, 128),
    "tpu": (128, 512, 512),
    "cpu": (128, 128, 128),
}


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """``"pallas"`` or ``"xla"`` for ``impl`` on ``platform`` (default: the default backend)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if KERNEL not in _policy.VALIDATED:  # no record kept for this kernel: nothing validated
        return "xla" if impl == "auto" else impl
    return _policy.resolve(KERNEL, impl, platform)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _fit_tile(block: int, length: int, *, variant: str, interpret: bool, axis: str) -> int:
    """Shrink ``block`` for short dims and check it against the target's tiling rules."""
    if interpret:
        fitted, ok, rule = min(block, _round_up(length, 8)), block % 8 == 0, "a multiple of 8"
    elif variant == "gpu":  # Triton: power-of-two tiles, at least 16 for tensor-core dots
        fitted = min(block, max(16, _next_pow2(length)))
        ok, rule = block >= 16 and block == _next_pow2(block), "a power of two >= 16 (Triton)"
    else:  # Mosaic TPU: every tile dim is a lane dim of some block or dot operand
        fitted = min(block, _round_up(length, 128))
        ok, rule = block % 128 == 0, "a multiple of 128 (Mosaic TPU)"
    if not ok or block <= 0:
        raise ValueError(f"block_{axis}={block} must be {rule}")
    return fitted


def make_spec(m: int, k: int, n: int, *, variant: str, interpret: bool, block_m: int | None,
              block_k: int | None, block_n: int | None) -> kernel.Spec:
    """Tiles fitted to the shape, and the kernels' launch parameters."""
    dm, dk, dn = DEFAULT_TILES["cpu" if interpret else variant]
    fit = functools.partial(_fit_tile, variant=variant, interpret=interpret)
    return kernel.Spec(variant=variant, block_m=fit(block_m or dm, m, axis="m"),
                       block_k=fit(block_k or dk, k, axis="k"),
                       block_n=fit(block_n or dn, n, axis="n"), interpret=interpret)


# -------------------------------------------------------------------------------------------------
# custom_vjp over padded arrays


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gmm(spec: kernel.Spec, m: int, out_dtype, lhs, rhs, group_sizes):
    return _gmm_fwd(spec, m, out_dtype, lhs, rhs, group_sizes)[0]


def _gmm_fwd(spec: kernel.Spec, m: int, out_dtype, lhs, rhs, group_sizes):
    meta = kernel.make_group_metadata(group_sizes, m=m, m_pad=lhs.shape[0], block_m=spec.block_m)
    out = kernel.gmm(lhs, rhs, meta, spec, transpose_rhs=False, out_dtype=out_dtype)
    return out, (lhs, rhs, meta)


def _gmm_bwd(spec: kernel.Spec, m: int, out_dtype, residuals, dout):
    lhs, rhs, meta = residuals
    dout = dout.astype(lhs.dtype)  # the kernels multiply in the inputs' dtype
    dlhs = kernel.gmm(dout, rhs, meta, spec, transpose_rhs=True, out_dtype=lhs.dtype)
    drhs = kernel.tgmm(lhs, dout, meta, spec, num_groups=rhs.shape[0], out_dtype=rhs.dtype)
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _pad_to(x: Array, shape: tuple[int, ...]) -> Array:
    if x.shape == shape:
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape, strict=True)])


# -------------------------------------------------------------------------------------------------
# the public op


def grouped_matmul(lhs_MK: Array, rhs_EKN: Array, group_sizes_E: Array, *,
                   preferred_element_type=None,
                   impl: Literal["auto", "pallas", "xla"] = "auto",
                   interpret: bool | None = None,
                   platform: Literal["gpu", "tpu"] | None = None,
                   block_m: int | None = None, block_k: int | None = None,
                   block_n: int | None = None) -> Array:
    """Grouped matmul with the contract of ``jax.lax.ragged_dot(lhs, rhs, group_sizes)``.

    Args:
      lhs_MK: ``[M, K]`` rows sorted by group: group ``e`` owns the next ``group_sizes_E[e]`` rows.
      rhs_EKN: ``[E, K, N]`` one weight matrix per group.
      group_sizes_E: ``[E]`` integer row counts (empty groups allowed; their sum may be below
        ``M`` — the remaining rows give zeros — and is clamped to ``M``).
      preferred_element_type: output dtype (default: the inputs' common dtype); products always
        accumulate in float32.
      impl: "pallas" runs the kernels; "xla" runs ``jax.lax.ragged_dot``; "auto" the kernels only on
        a platform where their compiled tests have passed (``pallas_kernels._policy``; none yet).
      interpret: run the kernels in Pallas's interpreter; default: on CPU.
      platform: which kernel variant, "gpu" (Triton, loop schedule) or "tpu" (Mosaic TPU, grid
        schedule over the group metadata); default: the default backend's, "gpu" on CPU.
      block_m, block_k, block_n: tiles (default :data:`DEFAULT_TILES`, shrunk for small dims); any
        shape works, inputs are padded to whole tiles internally.

    Returns:
      ``[M, N]``. Differentiable in ``lhs`` and ``rhs`` (a ``custom_vjp`` whose backward runs the
      d-lhs grouped matmul and the transposed grouped matmul for d-rhs).
    """
    if lhs_MK.ndim != 2 or rhs_EKN.ndim != 3 or lhs_MK.shape[1] != rhs_EKN.shape[1]:
        raise ValueError(f"expected lhs [M, K] and rhs [E, K, N]; got {lhs_MK.shape}, "
                         f"{rhs_EKN.shape}")
    E = rhs_EKN.shape[0]
    group_sizes_E = jnp.asarray(group_sizes_E)
    if group_sizes_E.shape != (E,) or not jnp.issubdtype(group_sizes_E.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an integer array of shape ({E},); got "
                         f"{group_sizes_E.dtype} {group_sizes_E.shape}")
    impl = resolve_impl(impl)
    dtype = jnp.promote_types(lhs_MK.dtype, rhs_EKN.dtype)
    out_dtype = jnp.dtype(preferred_element_type or dtype)
    group_sizes_E = group_sizes_E.astype(jnp.int32)
    if impl == "xla":
        return jax.lax.ragged_dot(lhs_MK, rhs_EKN, group_sizes_E,
                                  preferred_element_type=preferred_element_type)

    backend = jax.default_backend()
    variant = platform or ("tpu" if backend == "tpu" else "gpu")
    if variant not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    interpret = (backend == "cpu") if interpret is None else bool(interpret)
    M, K = lhs_MK.shape
    N = rhs_EKN.shape[2]
    spec = make_spec(M, K, N, variant=variant, interpret=interpret, block_m=block_m,
                     block_k=block_k, block_n=block_n)
    Mp, Kp, Np = (_round_up(M, spec.block_m), _round_up(K, spec.block_k),
                  _round_up(N, spec.block_n))
    lhs = _pad_to(lhs_MK.astype(dtype), (Mp, Kp))
    rhs = _pad_to(rhs_EKN.astype(dtype), (E, Kp, Np))
    out = _gmm(spec, M, out_dtype, lhs, rhs, group_sizes_E)
    return out[:M, :N]
