"""Uncertainty and checks for fitted laws: bootstrap over runs (every resample refitted from its own
multistart, all at once) with percentile intervals — of the allocation too, under 6ND or a
FLOPs-per-token function — and extrapolation checks (fit below a budget cut, test above it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jscale.laws import fitting as _fitting
from jscale.laws import optimize
from jscale.laws.allocation import closed_form_n_opt, compute_optimal
from jscale.laws.fitted import ChinchillaFit, FitResult, _log_predict_rows, _public
from jscale.laws.fitting import _Problem, fit
from jscale.laws.forms import CHINCHILLA, Law

#: Default number of bootstrap resamples.
BOOTSTRAP_RESAMPLES = 1000


#: Label of the closed-form allocation convention, training FLOPs ``C = 6·N·D``.
SIX_ND = "6ND"
#: Default label when an allocation is computed under a ``flops_per_token`` function.
FLOPS_PER_TOKEN = "flops_per_token(N)*D"


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """Bootstrap over runs: ``samples[name]`` holds each resample's fitted parameter; ``intervals``
    the percentile interval at level ``ci``; ``N_opt`` / ``D_opt`` (Chinchilla fits with ``budgets``)
    the intervals of the compute-optimal allocation at each budget, shape (len(budgets), 2), under
    the FLOP convention ``flops_convention`` (:data:`SIX_ND`: closed form under ``C = 6ND``; otherwise
    the label of the ``flops_per_token`` function they were solved under). ``objective[r]`` is
    resample ``r``'s refit objective and ``weights[r]`` its count of each fitted run."""

    n: int
    ci: float
    samples: dict[str, np.ndarray] = dataclasses.field(repr=False)
    intervals: dict[str, tuple[float, float]]
    budgets: np.ndarray | None = None
    N_opt: np.ndarray | None = None
    D_opt: np.ndarray | None = None
    n_failed: int = 0
    flops_convention: str | None = None
    objective: np.ndarray | None = dataclasses.field(default=None, repr=False)
    weights: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: intervals and, with budgets, the allocation intervals and their FLOP
        convention."""
        d: dict[str, Any] = {"n": self.n, "ci": self.ci, "n_failed": self.n_failed,
                             "intervals": {k: list(v) for k, v in self.intervals.items()}}
        if self.budgets is not None:
            d["budgets"] = self.budgets.tolist()
            d["flops_convention"] = self.flops_convention
            d["N_opt"] = self.N_opt.tolist()
            d["D_opt"] = self.D_opt.tolist()
        return d

    def allocation_intervals(self, C, flops_per_token: Callable[[np.ndarray], np.ndarray] | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
        """Intervals (level ``ci``) of the compute-optimal ``N_opt`` and ``D_opt`` at budgets ``C``
        from these samples, each of shape ``(len(C), 2)``: what :func:`bootstrap` with
        ``budgets=C`` and this ``flops_per_token`` reports, without refitting (Chinchilla fits)."""
        return _allocation_intervals(self.samples, C, flops_per_token, self.ci)


def percentile_interval(samples: np.ndarray, ci: float, axis: int = 0) -> np.ndarray:
    """Percentile interval ``[(1−ci)/2, (1+ci)/2]`` of ``samples`` along ``axis`` (NaNs ignored)."""
    q = 100.0 * np.array([(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return np.moveaxis(np.nanpercentile(samples, q, axis=axis), 0, -1)


def _resample_starts(result: FitResult, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per resample, the BOOTSTRAP_PER_STRATUM candidate starts of each stratum with the lowest
    objective under that resample's weights: ``(n, I, Q)``, and each start's stratum ``(n, I)``."""
    law = result.law
    cand = np.vstack([result.candidates, result.minima]) if result.candidates.size else result.minima
    with np.errstate(all="ignore"):
        resid = np.log(result.loss)[None, :] - _log_predict_rows(law, cand, result.inputs)
        # starts that converged to the same point count once (equal to float32 precision)
        ok = np.all(np.isfinite(resid), axis=1) & np.all(np.abs(cand) < 1e30, axis=1)
        keep = np.sort(np.unique(cand[ok].astype(np.float32), axis=0, return_index=True)[1])
    cand, resid = cand[ok][keep], resid[ok][keep]
    if cand.shape[0] == 0:
        raise RuntimeError("bootstrap: no candidate start has a finite objective")
    a = np.abs(resid)
    d = result.delta
    F = counts @ np.where(a <= d, 0.5 * resid * resid, d * (a - 0.5 * d)).T   # (n, candidates)
    labels = (law.strata(cand, result.loss) if law.strata is not None
              else np.zeros(cand.shape[0], int))
    per = _fitting.BOOTSTRAP_PER_STRATUM
    picks, strata = [], []
    for j, lab in enumerate(np.unique(labels)):
        cols = np.flatnonzero(labels == lab)
        if cols.size <= per:
            pick = np.broadcast_to(cols, (counts.shape[0], cols.size))
        else:
            pick = cols[np.argpartition(F[:, cols], per - 1, axis=1)[:, :per]]
        picks.append(pick)
        strata.append(np.full(pick.shape, j))
    return cand[np.concatenate(picks, axis=1)], np.concatenate(strata, axis=1)


def bootstrap(result: FitResult, n: int = BOOTSTRAP_RESAMPLES, *, seed: int = 0, ci: float = 0.95,
              budgets: Sequence[float] | None = None,
              flops_per_token: Callable[[np.ndarray], np.ndarray] | None = None,
              flops_convention: str | None = None) -> Bootstrap:
    """Resample the fitted runs with replacement ``n`` times and refit each resample, all resamples
    at once (a resample is a vector of per-run counts, so every refit has the same shapes).

    Every resample is refitted from its own multistart: the full fit's candidate starts (every
    start after each of its stages) are ranked by the resample's own objective, the best few of
    every stratum of the law (``Law.strata``; for Chinchilla, bins of E) are optimised, and those
    near the resample's best are run on while they still improve (see ``BOOTSTRAP_*`` in
    :mod:`jscale.laws.fitting`); ``objective`` and ``weights`` of the result let a refit be checked.
    Returns
    percentile intervals for every parameter and, for Chinchilla fits with ``budgets``, for the
    compute-optimal ``N_opt(C)`` and ``D_opt(C)``: under ``C = 6ND`` (closed form) by default, or
    with ``flops_per_token`` (training FLOPs per token as a function of N, as for
    :meth:`ChinchillaFit.compute_optimal`) numerically under ``C = flops_per_token(N)·D``;
    ``flops_convention`` labels that convention in the result (default :data:`SIX_ND` /
    :data:`FLOPS_PER_TOKEN`)."""
    if n < 2:
        raise ValueError(f"n: need at least 2 bootstrap resamples (got {n})")
    if not 0 < ci < 1:
        raise ValueError(f"ci: the interval level must be in (0, 1) (got {ci})")
    rng = np.random.default_rng(seed)
    m = result.n_points
    counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n).astype(float)      # (n, m)
    starts, strata = _resample_starts(result, counts)                              # (n, I, Q)
    k = starts.shape[1]
    resample = np.repeat(np.arange(n), k)
    iters, rtol, gap = _fitting.BOOTSTRAP_ITERS, _fitting.BOOTSTRAP_RTOL, _fitting.BOOTSTRAP_GAP
    with jax.enable_x64(True):
        problem = _Problem(result.law, result.inputs, result.loss, result.delta)
        # screening: every start, then the best of each (resample, stratum); in float32 for laws
        # with closed-form derivatives (about 2× cheaper per iteration, one more kernel to
        # compile), else in the fit's own float64 kernel
        screen = "float32" if result.law.lse is not None else "float64"
        theta, fval, index = problem.run(
            starts.reshape(n * k, -1), np.repeat(counts, k, 0),
            (optimize.Stage(None, _fitting.BOOTSTRAP_SCREEN_ITERS[0], screen),
             optimize.Stage(1, _fitting.BOOTSTRAP_SCREEN_ITERS[1], screen)),
            groups=resample * k + strata.ravel())
        r = resample[index]
        # float64 rounds for every start within BOOTSTRAP_GAP of its resample's best (wider after
        # the screening) while it still lowers its objective: a start on a slow path to a better
        # minimum is not dropped for a faster one that ends worse
        todo = np.flatnonzero(np.isfinite(fval))
        polished = np.full(fval.shape, screen == "float64")   # float32 objectives: good to ~1e-5
        for rnd in range(_fitting.BOOTSTRAP_ROUNDS):
            best = np.full(n, np.inf)
            np.minimum.at(best, r, fval)
            todo = todo[fval[todo] <= best[r[todo]] * (1.0 + gap[min(rnd, 1)])]
            if todo.size == 0:
                break
            t, f, _ = problem.run(theta[todo], counts[r[todo]], (optimize.Stage(None, iters),))
            better = (f < fval[todo]) | ~polished[todo]
            # improving? against a float32 objective only beyond its round-off
            still = f < fval[todo] * (1.0 - np.where(polished[todo], rtol,
                                                     _fitting.BOOTSTRAP_F32_RTOL))
            theta[todo[better]], fval[todo[better]] = t[better], f[better]
            polished[todo] = True
            todo = todo[still]
        fval = np.where(polished, fval, np.inf)
    top = optimize._keep_best(fval, 1, r)
    theta_b = np.full((n, theta.shape[1]), np.nan)
    fval_b = np.full(n, np.inf)
    theta_b[r[top]], fval_b[r[top]] = theta[top], fval[top]
    ok = np.isfinite(fval_b)
    public = _public(result.law, {p: theta_b[:, i] for i, p in enumerate(result.law.params)})
    samples = {name: np.where(ok, np.asarray(v, float), np.nan) for name, v in public.items()}
    intervals = {name: tuple(float(x) for x in percentile_interval(v, ci))
                 for name, v in samples.items()}
    out = dict(n=n, ci=ci, samples=samples, intervals=intervals, n_failed=int(np.sum(~ok)),
               objective=np.where(ok, fval_b, np.nan), weights=counts)
    if budgets is not None and isinstance(result, ChinchillaFit):
        C = np.asarray(budgets, float)
        N_iv, D_iv = _allocation_intervals(samples, C, flops_per_token, ci)
        out.update(budgets=C, N_opt=N_iv, D_opt=D_iv,
                   flops_convention=flops_convention or (
                       SIX_ND if flops_per_token is None else FLOPS_PER_TOKEN))
    return Bootstrap(**out)


def allocation_samples(samples: Mapping[str, np.ndarray], C,
                       flops_per_token: Callable[[np.ndarray], np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal ``(N, D)`` for every bootstrap sample of a Chinchilla fit at budgets ``C``,
    each of shape ``(len(C), n)``: closed form under ``C = 6ND`` when ``flops_per_token`` is None,
    else numerically under ``C = flops_per_token(N)·D`` (:func:`jscale.laws.compute_optimal`)."""
    C = np.asarray(C, float).ravel()[:, None]
    if flops_per_token is None:
        N = closed_form_n_opt(samples, C)
        return N, C / (6.0 * N)
    return compute_optimal({k: np.asarray(samples[k], float)[None, :]
                            for k in ("E", "A", "B", "alpha", "beta")}, C, flops_per_token)


def _allocation_intervals(samples, C, flops_per_token, ci) -> tuple[np.ndarray, np.ndarray]:
    missing = [k for k in ("E", "A", "B", "alpha", "beta") if k not in samples]
    if missing:
        raise ValueError(f"allocation: needs samples of a Chinchilla fit (missing {missing})")
    N_b, D_b = allocation_samples(samples, C, flops_per_token)          # (budgets, n)
    return percentile_interval(N_b, ci, axis=1), percentile_interval(D_b, ci, axis=1)


# ---------------------------------------------------------------------------------------------------
# extrapolation


@dataclasses.dataclass(frozen=True)
class Extrapolation:
    """A law fitted on the runs with ``budget < cut``, judged on the runs at or above it."""

    cut: float
    fit: FitResult
    held_out: np.ndarray = dataclasses.field(repr=False)     # boolean mask over the given runs
    predicted: np.ndarray = dataclasses.field(repr=False)    # on the held-out runs
    observed: np.ndarray = dataclasses.field(repr=False)
    mean_abs_rel_error: float
    max_abs_rel_error: float
    rmse: float

    def to_dict(self) -> dict[str, Any]:
        return {"cut": self.cut, "n_fit": int(np.sum(~self.held_out)),
                "n_held_out": int(np.sum(self.held_out)),
                "mean_abs_rel_error": self.mean_abs_rel_error,
                "max_abs_rel_error": self.max_abs_rel_error, "rmse": self.rmse,
                "fit": self.fit.to_dict()}


def extrapolation_check(inputs: Mapping[str, Any], loss, budget, cut: float, *,
                        law: Law = CHINCHILLA, **fit_kwargs) -> Extrapolation:
    """Fit ``law`` on the runs whose ``budget`` is below ``cut`` and report the prediction error on
    the others (relative error of the predicted loss)."""
    budget = np.asarray(budget, float).ravel()
    loss = np.asarray(loss, float).ravel()
    held = budget >= cut
    if held.all() or not held.any():
        raise ValueError(f"cut: {cut:g} must leave runs on both sides (budgets "
                         f"{np.unique(budget).tolist()})")
    x = {k: np.asarray(v, float).ravel() for k, v in inputs.items()}
    cls = ChinchillaFit if law is CHINCHILLA else FitResult
    result = fit(law, {k: v[~held] for k, v in x.items()}, loss[~held],
                 fit_kwargs.pop("init_grid", None), result_cls=cls, **fit_kwargs)
    pred = result.predict(**{k: v[held] for k, v in x.items()})
    rel = pred / loss[held] - 1.0
    return Extrapolation(cut=float(cut), fit=result, held_out=held, predicted=pred,
                         observed=loss[held], mean_abs_rel_error=float(np.mean(np.abs(rel))),
                         max_abs_rel_error=float(np.max(np.abs(rel))),
                         rmse=float(np.sqrt(np.mean((pred - loss[held]) ** 2))))
