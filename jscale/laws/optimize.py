"""Many-start robust fitting: a fixed-iteration Levenberg–Marquardt / Newton minimiser of the Huber
loss on log residuals, vectorised over all starting points at once.

Why not L-BFGS under ``vmap``: its line search is a data-dependent while loop, and under ``vmap``
every start waits for the slowest one. A scaling law has a handful of parameters, so curvature
matrices are tiny. Each iteration computes, per start, the gradient ``g``, the Gauss–Newton matrix
of the Huber loss's iteratively-reweighted least-squares majoriser ``H_gn = Σ_n w_n q_n q_nᵀ``
(``q_n = ∇ log L̂_n``, ``w_n = ρ'(r_n)/r_n``: 1 inside δ, δ/|r| outside; positive semi-definite, so
damped steps always descend) and the exact Hessian ``H``; it then tries a fixed ladder of damped
steps ``(H_gn + μ·diag H_gn) s = −g`` plus the undamped Newton step ``H s = −g`` (which converges
quadratically at the end), evaluates the objective at all of them — cheap next to the derivatives —
and keeps the best if it lowers the objective; a stage with ``extrapolate`` also tries 2, 4 and 8
times that step (a damped step along a flat valley of the Huber loss is short). No while loops:
every start runs the same straight-line program. Box bounds are handled by projection, with
coordinates at a bound whose gradient points outwards frozen for the step (projected Newton).

Derivatives: a law that declares its log-sum-exp structure (``Law.lse``: Chinchilla, the single
power law) gets them in closed form as matrix products; any other law by JAX autodiff.

Starts run in chunks of CHUNK (one compiled kernel per objective, dtype and data shape, reused by
every stage, fit and bootstrap); :func:`run_stages` runs a schedule of :class:`Stage` s (e.g. all
starts for a few iterations, then the best ones to convergence). float64 by default; a float32
stage is available (about 3× cheaper per iteration on CPU, one more kernel to compile).

Glossary (letters the project glossary of :mod:`jscale.nn` leaves free): I starts (or start ×
resample pairs), M data points, Q law parameters, U log-sum-exp terms, Z candidate steps per
iteration.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

#: Damping ladder for the Gauss–Newton steps, as multiples of each start's current μ.
LADDER = (0.0, 1e-3, 1e-1, 1e1, 1e3)
#: Initial and extreme damping.
MU_INIT, MU_MIN, MU_MAX = 1.0, 1e-12, 1e20
#: After an iteration where no ladder value lowered the objective, μ is multiplied by this.
MU_REJECT_FACTOR = 1e5
#: With ``Stage.extrapolate``: multiples of each iteration's best step also tried (the damped step
#: of a Huber objective along a flat valley is short: without them, crossing one took ~100
#: iterations on the degenerate data of tests/test_laws.py, with them a few).
EXTRAPOLATE = (2.0, 4.0, 8.0)
#: Starts are processed in chunks of this many (keeps the per-chunk working set in cache on CPU).
CHUNK = 64


def huber(r, delta):
    """Huber loss ``½r²`` for ``|r| ≤ δ``, ``δ(|r| − ½δ)`` beyond (Huber 1964)."""
    ar = jnp.abs(r)
    return jnp.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


@dataclasses.dataclass(frozen=True)
class Objective:
    """Batched objective pieces: ``f(theta_IQ, w_IM, data) -> f_I`` and ``fgh(theta_IQ, w_IM, data)
    -> (f_I, g_IQ, H_IQQ, Hgn_IQQ)`` (exact Hessian and Gauss–Newton matrix). ``w_IM`` are
    per-point weights (bootstrap counts); ``data`` is a pytree of arrays (:func:`structured_data`,
    :func:`autodiff_data`), an argument so that one compiled kernel serves every data set of the
    same shape."""

    f: Callable
    fgh: Callable


def structured_data(G_UMQ: np.ndarray, h_UM: np.ndarray, y_M: np.ndarray, delta: float,
                    dtype) -> dict:
    """Arrays for :data:`STRUCTURED`: the data-only products ``G_k G_lᵀ`` are precomputed."""
    U, M, Q = G_UMQ.shape
    outer = []
    for k in range(U):
        for l in range(k, U):
            o = np.einsum("ni,nj->nij", G_UMQ[k], G_UMQ[l])
            if k != l:
                o = o + np.swapaxes(o, 1, 2)
            outer.append(o.reshape(M, Q * Q))
    return {"G": jnp.asarray(G_UMQ, dtype), "h": jnp.asarray(h_UM, dtype),
            "y": jnp.asarray(y_M, dtype), "delta": jnp.asarray(delta, dtype),
            "Phi": jnp.asarray(np.concatenate(outer, 0), dtype),        # (pairs·M, Q·Q)
            "G_cat": jnp.asarray(G_UMQ.reshape(U * M, Q), dtype)}       # (U·M, Q)


def _lse_terms(theta, data):
    G, h, y = data["G"], data["h"], data["y"]
    terms = [theta @ G[k].T + h[k] for k in range(G.shape[0])]        # U × (I, M)
    mx = terms[0]
    for u in terms[1:]:
        mx = jnp.maximum(mx, u)
    ex = [jnp.exp(u - mx) for u in terms]
    s = sum(ex)
    return y - mx - jnp.log(s), ex, s


def _structured_f(theta, w, data):
    r, _, _ = _lse_terms(theta, data)
    return jnp.sum(w * huber(r, data["delta"]), axis=-1)


def _structured_fgh(theta, w, data):
    """``log L = LSE_k(G_k·θ + h_k)``: with ``p = softmax(u)``, ``q = Σ_k p_k G_k = ∇m`` and ``ρ', ρ''``
    the Huber derivatives at ``r = y − m``: ``g = −Σ_n ρ' q``,
    ``H = Σ_n Σ_kl [(ρ''+ρ') p_k p_l − δ_kl ρ' p_k] G_k G_lᵀ`` and ``H_gn = Σ_n Σ_kl (ρ'/r) p_k p_l
    G_k G_lᵀ`` — the data-only products ``G_k G_lᵀ`` are precomputed, so each is one matrix product."""
    I, Q = theta.shape
    U = data["G"].shape[0]
    delta = data["delta"]
    r, ex, s = _lse_terms(theta, data)
    inv = 1.0 / s
    p = [e * inv for e in ex]
    ar = jnp.abs(r)
    r1 = w * jnp.clip(r, -delta, delta)                                 # w·ρ'(r)
    c = w * (ar <= delta).astype(theta.dtype) + r1                      # w·(ρ'' + ρ')
    c_gn = w * jnp.where(ar <= delta, 1.0, delta / jnp.maximum(ar, delta))   # w·ρ'(r)/r
    fval = jnp.sum(w * huber(r, delta), axis=-1)
    g = -(jnp.concatenate([r1 * pk for pk in p], 1) @ data["G_cat"])
    pairs = [(k, l) for k in range(U) for l in range(k, U)]
    pp = [p[k] * p[l] for k, l in pairs]
    cs = jnp.concatenate([c * q - (r1 * p[k] if k == l else 0.0)
                          for (k, l), q in zip(pairs, pp, strict=True)], 1)
    cs_gn = jnp.concatenate([c_gn * q for q in pp], 1)
    H = (cs @ data["Phi"]).reshape(I, Q, Q)
    H_gn = (cs_gn @ data["Phi"]).reshape(I, Q, Q)
    return fval, g, H, H_gn


#: The closed-form objective of log-sum-exp-linear laws (``Law.lse``).
STRUCTURED = Objective(f=_structured_f, fgh=_structured_fgh)


def autodiff_data(inputs: dict[str, np.ndarray], y_M: np.ndarray, delta: float, dtype) -> dict:
    """Arrays for :func:`autodiff_objective`."""
    return {"x": {k: jnp.asarray(v, dtype) for k, v in inputs.items()},
            "y": jnp.asarray(y_M, dtype), "delta": jnp.asarray(delta, dtype)}


def autodiff_objective(log_predict: Callable, params: tuple[str, ...]) -> Objective:
    """Objective for any ``log_predict(theta_dict, inputs_dict)``: the per-point Jacobian by forward
    mode (for ``g`` and ``H_gn``), the exact Hessian forward-over-reverse."""

    def m(theta, data):
        return log_predict(dict(zip(params, theta, strict=True)), data["x"])

    def one(theta, w, data):
        val = jnp.sum(w * huber(data["y"] - m(theta, data), data["delta"]))
        return jnp.where(jnp.isnan(val), jnp.inf, val)

    def one_fgh(theta, w, data):
        delta = data["delta"]
        eye = jnp.eye(theta.shape[0], dtype=theta.dtype)
        mv, J = jax.vmap(lambda v: jax.jvp(lambda t: m(t, data), (theta,), (v,)),
                         out_axes=(None, 1))(eye)                       # (M,), (M, Q)
        r = data["y"] - mv
        ar = jnp.abs(r)
        g = -(J.T @ (w * jnp.clip(r, -delta, delta)))
        c_gn = w * jnp.where(ar <= delta, 1.0, delta / jnp.maximum(ar, delta))
        H_gn = J.T @ (c_gn[:, None] * J)
        H = jax.hessian(one)(theta, w, data)
        return one(theta, w, data), g, H, H_gn

    return Objective(f=jax.vmap(one, (0, 0, None)), fgh=jax.vmap(one_fgh, (0, 0, None)))


def _solve_small(A, b):
    """Solve ``A x = b`` for a batch of small matrices (``A_...QQ``, ``b_...Q``) by Gauss–Jordan
    elimination in a ``fori_loop`` (compiles to a handful of ops). No pivoting: a bad pivot gives a
    non-finite step, which the caller rejects like any step that does not lower the objective."""
    Q = A.shape[-1]
    idx = jnp.arange(Q)

    def body(k, Ab):
        A, b = Ab
        e = (idx == k).astype(A.dtype)
        row = jnp.sum(A * e[:, None], axis=-2)                   # A[..., k, :]
        col = jnp.sum(A * e, axis=-1)                            # A[..., :, k]
        piv = jnp.sum(row * e, axis=-1)                          # A[..., k, k]
        row = row / piv[..., None]
        bk = jnp.sum(b * e, axis=-1) / piv
        c = col - e
        return A - c[..., :, None] * row[..., None, :], b - c * bk[..., None]

    return jax.lax.fori_loop(0, Q, body, (A, b))[1]


def _iterate(obj: Objective, data, theta, fval, mu, w, lower, upper, iters, extrapolate):
    """``iters`` iterations for a chunk of starts (``theta_IQ``, ``fval_I``, ``mu_I``, ``w_IM``);
    returns the updated ``(theta, fval, mu)``. ``extrapolate`` (a traced boolean): also try
    EXTRAPOLATE multiples of each iteration's best step."""
    dtype = theta.dtype
    I, Q = theta.shape
    ladder = jnp.asarray(LADDER, dtype)
    Z = ladder.shape[0] + 1                                             # + the Newton step
    eye = jnp.eye(Q, dtype=dtype)
    w_rep = jnp.repeat(w, Z, axis=0)

    def body(_, state):
        theta, fval, mu = state
        _, g, H, H_gn = obj.fgh(theta, w, data)
        # projected Newton: coordinates at a bound whose gradient pushes outwards are frozen
        frozen = ((theta <= lower) & (g > 0)) | ((theta >= upper) & (g < 0))
        free = ~frozen
        both = free[:, :, None] & free[:, None, :]
        fix = eye * frozen[:, :, None].astype(dtype)
        g = jnp.where(free & jnp.isfinite(g), g, 0.0)
        H = jnp.where(both & jnp.isfinite(H), H, 0.0) + fix
        H_gn = jnp.where(both & jnp.isfinite(H_gn), H_gn, 0.0) + fix
        diag = jnp.abs(jnp.diagonal(H_gn, axis1=1, axis2=2))
        floor = 1e-12 * jnp.max(diag, axis=1, keepdims=True) + jnp.finfo(dtype).tiny
        scale = jnp.maximum(diag, floor)                                # Marquardt scaling (I, Q)
        mus = mu[:, None] * ladder[None, :]                             # (I, Z-1)
        A = jnp.concatenate([H_gn[:, None] + mus[:, :, None, None] * (eye * scale[:, None, :, None]),
                             H[:, None]], axis=1)                       # (I, Z, Q, Q)
        steps = _solve_small(A, jnp.broadcast_to(-g[:, None, :], (I, Z, Q)))
        cand = jnp.clip(theta[:, None, :] + steps, lower, upper)      # (I, Z, Q)
        fc = obj.f(cand.reshape(I * Z, Q), w_rep, data).reshape(I, Z)
        fc = jnp.where(jnp.isfinite(fc) & jnp.all(jnp.isfinite(steps), -1), fc, jnp.inf)
        best = jnp.argmin(fc, axis=1)
        f_best = jnp.min(fc, axis=1)
        ok = f_best < fval
        pick = jnp.take_along_axis(cand, best[:, None, None], axis=1)[:, 0]

        def longer(args):
            # longer steps along the chosen direction: flat valleys are crossed in a few iterations
            pick, f_best = args
            ext = jnp.asarray(EXTRAPOLATE, dtype)
            Ze = ext.shape[0]
            cand_e = jnp.clip(theta[:, None, :] + ext[None, :, None] * (pick - theta)[:, None, :],
                              lower, upper)
            fe = obj.f(cand_e.reshape(I * Ze, Q), jnp.repeat(w, Ze, axis=0), data).reshape(I, Ze)
            fe = jnp.where(jnp.isfinite(fe), fe, jnp.inf)
            use = jnp.min(fe, axis=1) < f_best
            best_e = jnp.take_along_axis(cand_e, jnp.argmin(fe, axis=1)[:, None, None], axis=1)[:, 0]
            return (jnp.where(use[:, None], best_e, pick),
                    jnp.where(use, jnp.min(fe, axis=1), f_best))

        pick, f_best = jax.lax.cond(extrapolate, longer, lambda args: args, (pick, f_best))
        theta = jnp.where(ok[:, None], pick, theta)
        fval = jnp.where(ok, f_best, fval)
        mus = jnp.concatenate([mus, jnp.zeros((I, 1), dtype)], axis=1)
        mu_best = jnp.sum(jnp.where(jnp.arange(Z) == best[:, None], mus, 0.0), axis=1)
        mu = jnp.where(ok, jnp.where(mu_best > 0, mu_best, mu * 1e-2), mu * MU_REJECT_FACTOR)
        return theta, fval, jnp.clip(mu, MU_MIN, MU_MAX)

    return jax.lax.fori_loop(0, iters, body, (theta, fval, mu))


@functools.lru_cache(maxsize=64)
def _chunk_program(obj: Objective):
    """The jitted kernel that evaluates a chunk of CHUNK starts and runs a dynamic number of
    iterations on it; one compiled program per (objective, dtype, data shape) serves every stage,
    fit and bootstrap resample of that shape."""

    def program(theta, mu, w, data, lower, upper, iters, extrapolate):
        theta = jnp.clip(theta, lower, upper)
        fval = obj.f(theta, w, data)
        fval = jnp.where(jnp.isfinite(fval), fval, jnp.inf)
        return _iterate(obj, data, theta, fval, mu, w, lower, upper, iters, extrapolate)

    return jax.jit(program)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.broadcast_to(a[:1], (rows - a.shape[0],) + a.shape[1:])])


def _over_chunks(fn, arrays: tuple[np.ndarray, ...], *rest):
    """Call ``fn(*chunk_of_each_array, *rest)`` on consecutive CHUNK-row slices (the last one padded);
    dispatches all chunks before waiting for any, and returns the concatenated numpy results."""
    I = arrays[0].shape[0]
    outs = []
    for i in range(0, I, CHUNK):
        outs.append(fn(*(_pad_rows(a[i:i + CHUNK], CHUNK) for a in arrays), *rest))
    outs = [jax.tree.map(np.asarray, o) for o in outs]
    return jax.tree.map(lambda *parts: np.concatenate(parts)[:I], *outs)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a multistart run: keep the ``keep`` best starts so far (all if None) and run
    ``iters`` iterations on them in ``dtype`` ("float32" or "float64"); with ``extrapolate`` each
    iteration also tries longer steps along its best one (:data:`EXTRAPOLATE`: a few more objective
    evaluations per iteration, far fewer iterations along flat valleys)."""

    keep: int | None
    iters: int
    dtype: str = "float64"
    extrapolate: bool = True

    def __post_init__(self):
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"Stage.keep: must be ≥ 1 or None (got {self.keep})")
        if self.iters < 0:
            raise ValueError(f"Stage.iters: must be ≥ 0 (got {self.iters})")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"Stage.dtype: must be 'float32' or 'float64' (got {self.dtype!r})")


def _keep_best(fval: np.ndarray, keep: int, groups: np.ndarray | None) -> np.ndarray:
    """Indices of the ``keep`` lowest ``fval`` (ties: first), overall or within each group."""
    if groups is None:
        return np.argsort(fval, kind="stable")[:keep]
    order = np.lexsort((np.arange(fval.size), fval, groups))          # by group, then by fval
    g = groups[order]
    first = np.searchsorted(g, g, side="left")                        # g is sorted
    return np.sort(order[np.arange(order.size) - first < keep])


def run_stages(obj: Objective, datas: dict, starts: np.ndarray, w: np.ndarray, lower: np.ndarray,
               upper: np.ndarray, stages: tuple[Stage, ...], *, groups: np.ndarray | None = None,
               trace: list | None = None):
    """Run ``stages`` from ``starts_IQ`` with point weights ``w_IM``; ``datas[dtype]`` is the data
    pytree in each dtype used. Returns numpy float64 ``(theta_I'Q, fval_I', index_I')`` for the
    starts that reached the last stage (``index`` into ``starts``). Call with x64 enabled.

    ``groups_I`` (optional, integers): a stage's ``keep`` then applies within each group — e.g. the
    starts of each bootstrap resample — instead of over all starts. ``trace`` (optional list): each
    stage appends its ``(theta, fval, index)``."""
    theta = np.clip(np.asarray(starts, np.float64), lower, upper)
    w = np.asarray(w, np.float64)
    index = np.arange(theta.shape[0])
    mu = np.full(theta.shape[0], MU_INIT)
    groups = None if groups is None else np.asarray(groups)
    if groups is not None and groups.shape != index.shape:
        raise ValueError(f"groups: expected one group label per start ({index.size}), "
                         f"got shape {groups.shape}")
    fval = None
    for st in stages:
        dt = np.dtype(st.dtype)
        args = (datas[st.dtype], jnp.asarray(lower, dt), jnp.asarray(upper, dt))

        def run(theta, mu, w, iters, dt=dt, args=args, ext=st.extrapolate):
            arrays = tuple(a.astype(dt) for a in (theta, mu, w))
            out = _over_chunks(_chunk_program(obj), arrays, *args, jnp.asarray(iters, jnp.int32),
                               jnp.asarray(bool(ext)))
            return tuple(a.astype(np.float64) for a in out)

        if st.keep is not None and st.keep < theta.shape[0]:
            if fval is None:                     # pruning before any iteration: rank the starts
                _, fval, _ = run(theta, mu, w, 0)
            top = _keep_best(fval, st.keep, None if groups is None else groups[index])
            theta, mu, w, index = theta[top], mu[top], w[top], index[top]
        # each stage re-evaluates its starts in its own precision before iterating
        theta, fval, mu = run(theta, mu, w, st.iters)
        if trace is not None:
            trace.append((theta, fval, index))
    return theta, fval, index
