"""Pure-jnp selective scans: the sequential oracle and a chunked associative variant.

Semantics are those of ``selective_scan_ref`` in state-spaces/mamba
(``mamba_ssm/ops/selective_scan_interface.py``) for real ``A`` and input-dependent ``B``/``C``
shared across channels, in jscale's time-major layout (``[B, T, D]``, not the original's
``[B, D, L]``)::

    Δ'  = softplus(Δ + delta_bias)        (bias and softplus each optional; softplus as torch's:
                                           log1p(exp(x)) for x <= 20, else x)
    h_t = exp(Δ'_t A) ⊙ h_{t-1} + Δ'_t B_t u_t        h_{-1} = 0, h: [B, D, N] in float32
    y_t = C_t · h_t + D u_t                            (D optional)
    out = y · silu(z)                                  (z optional), cast to u's dtype

``return_last_state`` also returns ``h_{T-1}`` (``[B, D, N]``, float32). ``reset`` (``[B, T]``, bool
or 0/1) extends the original like its ``cu_seqlens`` argument: where ``reset[b, t]`` is true a new
sequence starts, ``h_{t-1}`` is dropped and ``h_t = Δ'_t B_t u_t`` (packed documents do not see each
other).

Letters here: B batch, T time, D channels, N state (``B``/``C``/``D`` alone are the operands).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def softplus(x: Array) -> Array:
    """torch's ``F.softplus`` (beta 1, threshold 20), as in the CUDA kernel: identity above 20."""
    return jnp.where(x <= 20.0, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))), x)


def discretize(u: Array, delta: Array, A: Array, B: Array, delta_bias: Array | None,
               delta_softplus: bool) -> tuple[Array, Array]:
    """``(Δ', Δ' ⊙ u)`` in float32, ``[B, T, D]`` each."""
    delta = delta.astype(jnp.float32)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(jnp.float32)
    if delta_softplus:
        delta = softplus(delta)
    return delta, delta * u.astype(jnp.float32)


def _finish(y: Array, u: Array, D: Array | None, z: Array | None) -> Array:
    if D is not None:
        y = y + u.astype(jnp.float32) * D.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(u.dtype)


def selective_scan_ref(u: Array, delta: Array, A: Array, B: Array, C: Array, D: Array | None = None,
                       z: Array | None = None, delta_bias: Array | None = None,
                       delta_softplus: bool = False, return_last_state: bool = False,
                       reset: Array | None = None):
    """The oracle: the recurrence step by step with ``lax.scan`` over time.

    Args:
      u, delta, z: ``[B, T, D]``. A: ``[D, N]`` (real). B, C: ``[B, T, N]``. D, delta_bias: ``[D]``.
      reset: optional ``[B, T]``; true where a new sequence starts (state zeroed before the step).

    Returns:
      ``out [B, T, D]`` (u's dtype), and ``last_state [B, D, N]`` (float32) if
      ``return_last_state``.
    """
    dt, dtu = discretize(u, delta, A, B, delta_bias, delta_softplus)
    A32 = A.astype(jnp.float32)
    Bf, Cf = B.astype(jnp.float32), C.astype(jnp.float32)
    keep = (jnp.ones(u.shape[:2], jnp.float32) if reset is None
            else 1.0 - reset.astype(jnp.float32))

    def step(h, xs):
        dt_t, dtu_t, b_t, c_t, keep_t = xs          # [B, D], [B, D], [B, N], [B, N], [B]
        dA = jnp.exp(dt_t[:, :, None] * A32) * keep_t[:, None, None]
        h = dA * h + dtu_t[:, :, None] * b_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, c_t)

    h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), jnp.float32)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (dt, dtu, Bf, Cf, keep))
    last, y = lax.scan(step, h0, xs)
    out = _finish(jnp.moveaxis(y, 0, 1), u, D, z)
    return (out, last) if return_last_state else out


def associative_scan(a: Array, b: Array) -> tuple[Array, Array]:
    """Inclusive scan of ``h_t = a_t h_{t-1} + b_t`` along axis 1 by recursive doubling
    (Hillis–Steele): ``log2(K)`` rounds of ``(a, b)_t ← (a_{t-k} a_t, a_t b_{t-k} + b_t)``. Returns
    ``(Π a, h)`` with ``h_{-1} = 0``. ``K log K`` work but few, large ops: cheap to compile and
    autodiff, unlike ``lax.associative_scan``'s odd/even recursion."""
    K, k = a.shape[1], 1
    while k < K:
        pad = [(0, 0)] * a.ndim
        pad[1] = (k, 0)
        a_prev = jnp.pad(a[:, :-k], pad, constant_values=1.0)
        b_prev = jnp.pad(b[:, :-k], pad)
        a, b = a * a_prev, a * b_prev + b
        k *= 2
    return a, b


def selective_scan_chunked(u: Array, delta: Array, A: Array, B: Array, C: Array,
                           D: Array | None = None, z: Array | None = None,
                           delta_bias: Array | None = None, delta_softplus: bool = False,
                           return_last_state: bool = False, reset: Array | None = None, *,
                           chunk: int = 64):
    """The same scan as :func:`selective_scan_ref`: an associative scan (:func:`associative_scan`)
    inside chunks of ``chunk`` steps and a sequential ``lax.scan`` across chunks.

    Each chunk materializes its ``[B, chunk, D, N]`` transitions and is rematerialized in the
    backward pass (``jax.checkpoint``), so autodiff keeps only chunk-boundary states.
    ``chunk >= T`` is the plain associative scan. This is the portable XLA path (``impl="xla"``).
    """
    batch, T, d = u.shape
    n = A.shape[1]
    chunk = max(1, min(chunk, T))
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    dt, dtu = discretize(u, delta, A, B, delta_bias, delta_softplus)
    keep = (jnp.ones((batch, T), jnp.float32) if reset is None
            else 1.0 - reset.astype(jnp.float32))
    Bf, Cf = B.astype(jnp.float32), C.astype(jnp.float32)
    if pad:  # padded steps have Δ' = 0: the state passes through them unchanged
        dt, dtu, Bf, Cf = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (dt, dtu, Bf, Cf))
        keep = jnp.pad(keep, ((0, 0), (0, pad)), constant_values=1.0)

    def to_chunks(x):  # [B, T', ...] -> [n_chunks, B, chunk, ...]
        return jnp.moveaxis(x.reshape(batch, n_chunks, chunk, *x.shape[2:]), 1, 0)

    A32 = A.astype(jnp.float32)

    @jax.checkpoint
    def chunk_step(h, xs):
        dt_c, dtu_c, b_c, c_c, keep_c = xs
        a = jnp.exp(dt_c[..., None] * A32) * keep_c[:, :, None, None]     # [B, K, D, N]
        b = dtu_c[..., None] * b_c[:, :, None, :]
        a_cum, b_cum = associative_scan(a, b)
        hs = a_cum * h[:, None] + b_cum
        return hs[:, -1], jnp.einsum("bkdn,bkn->bkd", hs, c_c)

    h0 = jnp.zeros((batch, d, n), jnp.float32)
    last, y = lax.scan(chunk_step, h0, tuple(map(to_chunks, (dt, dtu, Bf, Cf, keep))))
    y = jnp.moveaxis(y, 0, 1).reshape(batch, n_chunks * chunk, d)[:, :T]
    out = _finish(y, u, D, z)
    return (out, last) if return_last_state else out
