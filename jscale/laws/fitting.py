"""Fitting laws to runs the way Chinchilla's Approach 3 does: Huber loss on log-loss residuals, from a
grid of starting points, every start optimised at once (see :mod:`jscale.laws.optimize`); the fitted
objects (:class:`FitResult`, :class:`ChinchillaFit`) are in :mod:`jscale.laws.fitted`. Bootstrap
intervals and extrapolation checks are in :mod:`jscale.laws.uncertainty`.

All fitting runs in float64 inside a scoped ``jax.enable_x64`` — the rest of the process keeps its
dtypes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jscale.laws import optimize
from jscale.laws.fitted import ChinchillaFit, FitResult, _inputs_dict, _public, predict_theta
from jscale.laws.forms import CHINCHILLA, PARSCALE, POWER_LAW, Law, grid_points, user_law

#: Huber δ on log-loss residuals (Hoffmann et al. 2022; Epoch AI's replication; ParScale).
HUBER_DELTA = 1e-3
#: A start "converged to the best fit" if its final objective is within this relative distance.
CONVERGED_RTOL = 1e-6
#: Default schedule for grids larger than SCREEN_ABOVE starts: every start for SCREEN_ITERS
#: iterations, then the KEEP best for POLISH_ITERS more (float64 throughout: one compiled kernel).
#: On Epoch's data and four synthetic laws, 4 screening iterations already keep starts that reach
#: (to 1e-15) the optimum found by running every start 100 iterations and the best 256 200 more.
SCREEN_ABOVE, SCREEN_ITERS, KEEP, POLISH_ITERS = 1024, 5, 128, 30
#: Default schedule for smaller grids: every start for ITERS iterations in float64.
ITERS = 60
#: The full fit keeps its BOOTSTRAP_STARTS best distinct minima (``FitResult.minima``).
BOOTSTRAP_STARTS = 4
#: Bootstrap refits (:func:`jscale.laws.bootstrap`), every resample its own multistart. The full
#: fit's candidate starts (every start after each of its stages, near-duplicates merged) are ranked
#: by each resample's own objective (exact: one matrix product); the BOOTSTRAP_PER_STRATUM best of
#: every stratum of the law (``Law.strata``: for Chinchilla, bins of E) start that resample's refit.
#: Screening (float32 for laws with closed-form derivatives): BOOTSTRAP_SCREEN_ITERS[0] iterations,
#: then the best start of each stratum BOOTSTRAP_SCREEN_ITERS[1] more. Then rounds of
#: BOOTSTRAP_ITERS float64 iterations (at most BOOTSTRAP_ROUNDS) for every start within BOOTSTRAP_GAP
#: (relative; [0] for the first round, [1] after) of its resample's best, while a round still lowers
#: its objective by more than BOOTSTRAP_RTOL: a start on a slow path to a better minimum is not
#: dropped for a faster one. On
#: degenerate data (15 runs on the cpu IsoFLOP grid whose fits sit on the E → 0 plateau,
#: tests/test_laws.py; five noise draws, 340 resamples) every refit reached the objective of a full
#: 4,500-start refit of its resample to 6e-14 or better.
BOOTSTRAP_PER_STRATUM, BOOTSTRAP_SCREEN_ITERS = 2, (5, 10)
BOOTSTRAP_ITERS, BOOTSTRAP_ROUNDS, BOOTSTRAP_RTOL, BOOTSTRAP_GAP = 20, 10, 1e-9, (0.5, 0.1)
#: Relative round-off of a float32 objective (a screened start's value is trusted only this far).
BOOTSTRAP_F32_RTOL = 1e-4


def default_stages(n_starts: int) -> tuple[optimize.Stage, ...]:
    """The schedule :func:`fit` uses for ``n_starts`` starting points."""
    if n_starts > SCREEN_ABOVE:
        return (optimize.Stage(None, SCREEN_ITERS, "float64", extrapolate=False),
                optimize.Stage(KEEP, POLISH_ITERS, "float64"))
    return (optimize.Stage(None, ITERS, "float64"),)


# ---------------------------------------------------------------------------------------------------
# fitting


def _check_data(law: Law, inputs: Mapping[str, np.ndarray], loss) -> np.ndarray:
    loss = np.asarray(loss, float).ravel()
    n = loss.shape[0]
    for k, v in inputs.items():
        if v.ravel().shape[0] != n:
            raise ValueError(f"inputs[{k!r}]: {v.size} values but loss has {n}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"inputs[{k!r}]: contains NaN or inf")
    if not np.all(np.isfinite(loss)) or np.any(loss <= 0):
        raise ValueError("loss: every value must be finite and > 0 (the fit is on log loss)")
    if n < len(law.params):
        raise ValueError(f"loss: {n} points cannot determine {len(law.params)} parameters "
                         f"{list(law.params)}")
    return loss


class _Problem:
    """A law and a data set prepared for :func:`optimize.run_stages` in float32 and float64."""

    def __init__(self, law: Law, inputs: dict[str, np.ndarray], loss: np.ndarray, delta: float):
        self.law = law
        y = np.log(loss)
        if law.lse is not None:
            G, h = law.lse(inputs)
            self.objective = optimize.STRUCTURED
            self.datas = {dt: optimize.structured_data(np.asarray(G, float), np.asarray(h, float),
                                                       y, delta, jnp.dtype(dt))
                          for dt in ("float32", "float64")}
        else:
            self.objective = _autodiff_objective(law)
            self.datas = {dt: optimize.autodiff_data(inputs, y, delta, jnp.dtype(dt))
                          for dt in ("float32", "float64")}
        self.lower, self.upper = law.box()

    def run(self, starts: np.ndarray, w: np.ndarray, stages, **kwargs) -> tuple[np.ndarray, ...]:
        return optimize.run_stages(self.objective, self.datas, starts, w, self.lower, self.upper,
                                   tuple(stages), **kwargs)


_AUTODIFF: dict[tuple[Callable, tuple[str, ...]], optimize.Objective] = {}
_USER_LAWS: dict[tuple[Callable, tuple[str, ...], tuple[str, ...]], Law] = {}


def _autodiff_objective(law: Law) -> optimize.Objective:
    # one Objective per (log_predict, params), so compiled kernels are reused across fits — bounds
    # and data are runtime arguments of the kernel
    key = (law.log_predict, law.params)
    if key not in _AUTODIFF:
        _AUTODIFF[key] = optimize.autodiff_objective(law.log_predict, law.params)
    return _AUTODIFF[key]


def _user_law(fn: Callable, params: tuple[str, ...], inputs: tuple[str, ...]) -> Law:
    key = (fn, params, inputs)
    if key not in _USER_LAWS:
        if len(_USER_LAWS) >= 64:
            _USER_LAWS.clear()
        _USER_LAWS[key] = user_law(fn, params, inputs)
    return _USER_LAWS[key]


def _distinct_minima(theta: np.ndarray, fval: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` rows of ``theta`` with the lowest objective and pairwise-distinct parameters."""
    order = np.argsort(fval, kind="stable")
    chosen: list[np.ndarray] = []
    for i in order:
        if not np.isfinite(fval[i]):
            break
        t = theta[i]
        if all(np.max(np.abs(t - c) / (np.abs(c) + 1e-3)) > 1e-3 for c in chosen):
            chosen.append(t)
        if len(chosen) == k:
            break
    return np.array(chosen)


def _candidates(trace: list) -> np.ndarray:
    """The distinct rows of every stage's ``theta`` with a finite objective."""
    rows = np.concatenate([t[np.isfinite(f)] for t, f, _ in trace])
    return np.unique(rows, axis=0)


def _statistics(law: Law, theta: dict[str, float], inputs, loss) -> tuple[float, float]:
    pred = predict_theta(law, theta, inputs)
    resid = loss - pred
    ss_res = float(np.sum(resid ** 2))
    ss_tot = float(np.sum((loss - loss.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return r2, math.sqrt(ss_res / loss.size)


def fit(law: Law | Callable, inputs: Mapping[str, Any] | Sequence[Any], loss,
        init_grid: Mapping[str, Sequence[float]] | np.ndarray | None = None, *,
        delta: float = HUBER_DELTA, bounds: Mapping[str, tuple[float, float]] | None = None,
        stages: Sequence[optimize.Stage] | None = None,
        result_cls: type[FitResult] = FitResult) -> FitResult:
    """Fit ``law`` to ``(inputs, loss)`` by minimising ``Σ Huber_δ(log loss − log L̂)`` from every
    starting point of ``init_grid`` at once and returning the best.

    ``law``: a :class:`Law` (e.g. ``jscale.laws.CHINCHILLA``) or any JAX function
    ``law(params, *inputs) -> loss`` — then ``init_grid`` (``{param: values}``, their Cartesian
    product) names its parameters and ``bounds`` optionally boxes them. ``inputs``: ``{name: array}``
    or a sequence in the law's input order. ``stages``: the optimisation schedule (default
    :func:`default_stages`). Returns a :class:`FitResult`.
    """
    if not isinstance(law, Law):
        if not callable(law):
            raise TypeError(f"law: expected a jscale.laws.Law or a callable, got {type(law).__name__}")
        if not isinstance(init_grid, Mapping):
            raise ValueError("init_grid: a user-supplied law needs init_grid={param: values}, "
                             "which also names its parameters")
        names = (tuple(inputs) if isinstance(inputs, Mapping)
                 else tuple(f"x{i}" for i in range(len(inputs))))
        law = _user_law(law, tuple(init_grid), names)
    if bounds:
        law = dataclasses.replace(law, bounds={**law.bounds, **bounds})
    if not delta > 0:
        raise ValueError(f"delta: the Huber δ must be > 0 (got {delta})")
    if isinstance(inputs, Mapping):
        x = _inputs_dict(law, (), dict(inputs), "inputs")
    else:
        x = _inputs_dict(law, tuple(inputs), {}, "inputs")
    x = {k: v.ravel() for k, v in x.items()}
    loss = _check_data(law, x, loss)
    starts = grid_points(law, init_grid)
    stages = tuple(stages) if stages is not None else default_stages(len(starts))
    if not stages:
        raise ValueError("stages: need at least one optimisation stage")
    with jax.enable_x64(True):
        problem = _Problem(law, x, loss, delta)
        trace: list = []
        theta, fval, _ = problem.run(starts, np.ones((len(starts), loss.size)), stages, trace=trace)
        # did the best start still improve? one more iteration tells
        best = int(np.argmin(fval))
        t2, f2, _ = problem.run(theta[best:best + 1], np.ones((1, loss.size)),
                                (optimize.Stage(None, 1, "float64"),))
    if not np.isfinite(fval[best]):
        raise RuntimeError(f"fit: no starting point gave a finite objective for law {law.name!r}; "
                           f"check init_grid, bounds and that the law is positive on the data")
    converged = bool(f2[0] >= fval[best] * (1.0 - 1e-9))
    theta_best = dict(zip(law.params, (float(v) for v in theta[best]), strict=True))
    public = _public(law, theta_best)
    r2, rmse = _statistics(law, theta_best, x, loss)
    n_conv = int(np.sum(fval <= fval[best] * (1.0 + CONVERGED_RTOL)))
    return result_cls(law=law, params=public, theta=theta_best, objective=float(fval[best]), r2=r2,
                      rmse=rmse, n_points=int(loss.size), n_starts=int(len(starts)),
                      n_converged=n_conv, converged=converged, delta=float(delta), inputs=x,
                      loss=loss, minima=_distinct_minima(theta, fval, BOOTSTRAP_STARTS),
                      candidates=_candidates(trace))


def fit_chinchilla(N, D, loss, *, init_grid=None, delta: float = HUBER_DELTA,
                   stages: Sequence[optimize.Stage] | None = None) -> ChinchillaFit:
    """Fit ``L = E + A/N^α + B/D^β`` (log-sum-exp parametrisation, default the 4,500-start
    Chinchilla grid). N parameters, D tokens, loss > 0."""
    return fit(CHINCHILLA, {"N": N, "D": D}, loss, init_grid, delta=delta, stages=stages,
               result_cls=ChinchillaFit)


def fit_power_law(x, y, *, init_grid=None, delta: float = HUBER_DELTA,
                  stages: Sequence[optimize.Stage] | None = None) -> FitResult:
    """Fit ``y = E + A/x^α`` (log-sum-exp parametrisation, 150-start grid)."""
    return fit(POWER_LAW, {"x": x}, y, init_grid, delta=delta, stages=stages)


def fit_parscale(N, P, loss, *, init_grid=None, delta: float = HUBER_DELTA,
                 stages: Sequence[optimize.Stage] | None = None) -> FitResult:
    """Fit ParScale's ``L = (A / (N·(k·ln P + 1)))^α + E`` the way its ``parametric_fit.py`` does:
    parameters (E, A/1e9, α, k) bounded below by 1e-8, its 300-start grid. N non-embedding
    parameters (with the prefix and aggregator parameters), P streams."""
    return fit(PARSCALE, {"N": N, "P": P}, loss, init_grid, delta=delta, stages=stages)
