"""``selective_scan``: the public op, a ``jax.custom_vjp`` over the Pallas kernels, impl switch.

``impl="pallas"`` runs :mod:`.kernel` (forward saves only chunk-start states; backward recomputes
each chunk), ``impl="xla"`` runs :func:`.reference.selective_scan_chunked` (differentiated by JAX).
``impl="auto"`` follows the policy of every kernel here (:mod:`pallas_kernels._policy`): the XLA
path until the kernel's compiled tests have passed on the platform, recorded in
``pallas_kernels._policy.VALIDATED["selective_scan"]`` — empty today (the kernels have run in
interpret mode and lowered for "cuda" (Mosaic GPU, sm90+) and "tpu", never compiled on either), so
``auto`` is XLA everywhere. On a recorded GPU, ``auto`` also needs Hopper or newer.
``interpret`` (default: on CPU) runs the Pallas kernels in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _policy
from pallas_kernels.selective_scan import kernel, reference

Array = jax.Array
IMPLS = ("auto", "pallas", "xla")


def _default_platform() -> str:
    return jax.default_backend()


def _gpu_is_hopper_or_newer() -> bool:
    try:
        cc = jax.devices()[0].compute_capability
    except (AttributeError, IndexError):
        return False
    return float(cc) >= 9.0


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """``"pallas"`` or ``"xla"`` for ``impl`` on ``platform`` (default: the default backend)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: must be one of {IMPLS} (got {impl!r})")
    platform = platform or _default_platform()
    choice = _policy.resolve("selective_scan", impl, platform)
    if impl == "auto" and choice == "pallas" and platform == "gpu" and not _gpu_is_hopper_or_newer():
        return "xla"  # Mosaic GPU needs sm90+
    return choice


def selective_scan(u: Array, delta: Array, A: Array, B: Array, C: Array, D: Array | None = None,
                   z: Array | None = None, delta_bias: Array | None = None,
                   delta_softplus: bool = False, return_last_state: bool = False,
                   reset: Array | None = None, *, impl: str = "auto",
                   interpret: bool | None = None, target: str | None = None,
                   chunk: int | None = None, block_d: int | None = None,
                   orientation: str | None = None):
    """Selective scan with the semantics of state-spaces/mamba's ``selective_scan_ref``.

    Args:
      u, delta: ``[B, T, D]`` inputs and raw step sizes. A: ``[D, N]``, real (negative for a stable
        recurrence). B, C: ``[B, T, N]``. D: optional ``[D]`` skip. z: optional ``[B, T, D]`` gate,
        ``out = y · silu(z)``. delta_bias: optional ``[D]`` added to ``delta``; ``delta_softplus``
        applies torch's softplus after it.
      return_last_state: also return the final state ``[B, D, N]`` (float32); unlike the original,
        its gradient is propagated.
      reset: optional ``[B, T]`` bool/0-1; true where a new sequence starts (state zeroed before the
        step; the original's ``cu_seqlens``). Not differentiated.
      impl: ``"auto" | "pallas" | "xla"``. interpret: run Pallas in interpret mode (default: when
        the default backend is CPU). target: ``"gpu" | "tpu"`` to build the compiled kernel for a
        platform other than the default one (lowering / export from a CPU host).
      chunk, block_d: kernel time-chunk and channel-block sizes (defaults per backend in
        :data:`.kernel.DEFAULTS`); ``chunk`` is also the XLA path's chunk. orientation: the kernel's
        state layout, ``"nd"`` or ``"dn"`` (defaults per backend; interpret mode runs either).

    Returns:
      ``out [B, T, D]`` in ``u``'s dtype, and ``last_state`` if ``return_last_state``.
    """
    batch, T, d = u.shape
    n = A.shape[-1]
    for name, x, shape in (("delta", delta, u.shape), ("z", z, u.shape), ("A", A, (d, n)),
                           ("B", B, (batch, T, n)), ("C", C, (batch, T, n)), ("D", D, (d,)),
                           ("delta_bias", delta_bias, (d,)), ("reset", reset, (batch, T))):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape} (got {x.shape})")
    if jnp.iscomplexobj(A):
        raise ValueError("selective_scan: complex A is not supported (real A only)")

    if resolve_impl(impl) == "xla":
        return reference.selective_scan_chunked(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reset,
            chunk=chunk or 64)

    if target not in (None, "gpu", "tpu"):
        raise ValueError(f"selective_scan: target must be None, 'gpu' or 'tpu' (got {target!r})")
    platform = target or _default_platform()
    if interpret is None:
        interpret = target is None and platform == "cpu"
    if interpret:
        backend = "interpret"
    elif platform in ("gpu", "cuda"):
        backend = "mosaic_gpu"
    elif platform == "tpu":
        backend = "tpu"
    else:
        raise ValueError(f"selective_scan: no compiled Pallas kernel for platform {platform!r}; "
                         "use interpret=True or impl='xla'")
    plan, t_pad, d_pad, n_pad = kernel.plan_for(
        backend, seq_len=T, d=d, n=n, chunk=chunk, block_d=block_d, orientation=orientation,
        has_z=z is not None, has_d=D is not None, has_bias=delta_bias is not None,
        has_reset=reset is not None, softplus=bool(delta_softplus),
        itemsize=jnp.dtype(u.dtype).itemsize)
    keep = None if reset is None else 1.0 - reset.astype(jnp.float32)
    out, last = _scan(plan, (t_pad, d_pad, n_pad), u, delta, A, B, C, D, z, delta_bias, keep)
    return (out, last) if return_last_state else out


# --------------------------------------------------------------------------------------------------
# custom_vjp over padded kernel calls


def _pad(x, pads, value=0.0):
    if x is None or not any(p for p in pads):
        return x
    return jnp.pad(x, [(0, p) for p in pads], constant_values=value)


def _padded(sizes, T, d, n, u, delta, A, B, C, D, z, delta_bias, keep):
    t_pad, d_pad, n_pad = sizes
    pt, pd, pn = t_pad - T, d_pad - d, n_pad - n
    return (_pad(u, (0, pt, pd)), _pad(delta, (0, pt, pd)), _pad(A, (pd, pn)),
            _pad(B, (0, pt, pn)), _pad(C, (0, pt, pn)), _pad(D, (pd,)), _pad(z, (0, pt, pd)),
            _pad(delta_bias, (pd,)), _pad(keep, (0, pt), 1.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(plan, sizes, u, delta, A, B, C, D, z, delta_bias, keep):
    return _scan_fwd(plan, sizes, u, delta, A, B, C, D, z, delta_bias, keep)[0]


def _scan_fwd(plan, sizes, u, delta, A, B, C, D, z, delta_bias, keep):
    batch, T, d = u.shape
    n = A.shape[1]
    padded = _padded(sizes, T, d, n, u, delta, A, B, C, D, z, delta_bias, keep)
    out, hs, last = kernel.forward(plan, *padded)
    return (out[:, :T, :d], last[:, :d, :n]), (padded, hs, (T, d, n))


def _scan_bwd(plan, sizes, res, cotangents):
    padded, hs, (T, d, n) = res
    u, delta, A, B, C, D, z, delta_bias, keep = padded
    dout, dlast = cotangents
    t_pad, d_pad, n_pad = sizes
    dout = _pad(dout.astype(u.dtype), (0, t_pad - T, d_pad - d))
    dlast = _pad(dlast.astype(jnp.float32), (0, d_pad - d, n_pad - n))
    du, ddelta, dA, dB, dC, dD, dz, dbias = kernel.backward(
        plan, dout, dlast, u, delta, A, B, C, D, z, delta_bias, keep, hs)

    batch = u.shape[0]

    def crop(g, like, shape):
        if g is None:
            return None
        return g[tuple(slice(0, s) for s in shape)].astype(like.dtype)

    chan, stat = (batch, T, d), (batch, T, n)
    return (crop(du, u, chan), crop(ddelta, delta, chan), crop(dA, A, (d, n)), crop(dB, B, stat),
            crop(dC, C, stat), crop(dD, D, (d,)), crop(dz, z, chan), crop(dbias, delta_bias, (d,)),
            None)


_scan.defvjp(_scan_fwd, _scan_bwd)
