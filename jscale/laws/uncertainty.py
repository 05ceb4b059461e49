"""Uncertainty and checks for fitted laws: bootstrap over runs (every resample refitted at once) with
percentile intervals, and extrapolation checks (fit below a budget cut, test above it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jscale.laws import optimize
from jscale.laws.allocation import closed_form_n_opt
from jscale.laws.fitting import (
    BOOTSTRAP_ITERS,
    ChinchillaFit,
    FitResult,
    _Problem,
    _public,
    fit,
)
from jscale.laws.forms import CHINCHILLA, Law

#: Default number of bootstrap resamples.
BOOTSTRAP_RESAMPLES = 1000


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """Bootstrap over runs: ``samples[name]`` holds each resample's fitted parameter; ``intervals``
    the percentile interval at level ``ci``; ``N_opt`` / ``D_opt`` (Chinchilla fits with ``budgets``)
    the intervals of the compute-optimal allocation at each budget, shape (len(budgets), 2)."""

    n: int
    ci: float
    samples: dict[str, np.ndarray] = dataclasses.field(repr=False)
    intervals: dict[str, tuple[float, float]]
    budgets: np.ndarray | None = None
    N_opt: np.ndarray | None = None
    D_opt: np.ndarray | None = None
    n_failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"n": self.n, "ci": self.ci, "n_failed": self.n_failed,
                             "intervals": {k: list(v) for k, v in self.intervals.items()}}
        if self.budgets is not None:
            d["budgets"] = self.budgets.tolist()
            d["N_opt"] = self.N_opt.tolist()
            d["D_opt"] = self.D_opt.tolist()
        return d


def percentile_interval(samples: np.ndarray, ci: float, axis: int = 0) -> np.ndarray:
    """Percentile interval ``[(1−ci)/2, (1+ci)/2]`` of ``samples`` along ``axis`` (NaNs ignored)."""
    q = 100.0 * np.array([(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return np.moveaxis(np.nanpercentile(samples, q, axis=axis), 0, -1)


def bootstrap(result: FitResult, n: int = BOOTSTRAP_RESAMPLES, *, seed: int = 0, ci: float = 0.95,
              budgets: Sequence[float] | None = None) -> Bootstrap:
    """Resample the fitted runs with replacement ``n`` times and refit each resample, all resamples
    at once (a resample is a vector of per-run counts, so every refit has the same shapes). Each
    resample starts from the full fit's best distinct minima. Returns percentile intervals for every
    parameter and, for Chinchilla fits with ``budgets``, for ``N_opt(C)`` and ``D_opt(C)``."""
    if n < 2:
        raise ValueError(f"n: need at least 2 bootstrap resamples (got {n})")
    if not 0 < ci < 1:
        raise ValueError(f"ci: the interval level must be in (0, 1) (got {ci})")
    rng = np.random.default_rng(seed)
    m = result.n_points
    counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n).astype(float)      # (n, m)
    starts = result.minima
    k = starts.shape[0]
    with jax.enable_x64(True):
        problem = _Problem(result.law, result.inputs, result.loss, result.delta)
        theta, fval, index = problem.run(np.tile(starts, (n, 1)), np.repeat(counts, k, axis=0),
                                         (optimize.Stage(None, BOOTSTRAP_ITERS, "float64"),))
    order = np.argsort(index)
    theta, fval = theta[order].reshape(n, k, -1), fval[order].reshape(n, k)
    best = np.argmin(fval, axis=1)
    theta_b = theta[np.arange(n), best]                                            # (n, P)
    ok = np.isfinite(fval[np.arange(n), best])
    public = _public(result.law, {p: theta_b[:, i] for i, p in enumerate(result.law.params)})
    samples = {name: np.where(ok, np.asarray(v, float), np.nan) for name, v in public.items()}
    intervals = {name: tuple(float(x) for x in percentile_interval(v, ci))
                 for name, v in samples.items()}
    out = dict(n=n, ci=ci, samples=samples, intervals=intervals, n_failed=int(np.sum(~ok)))
    if budgets is not None and isinstance(result, ChinchillaFit):
        C = np.asarray(budgets, float)
        N_b = closed_form_n_opt(samples, C[:, None])                                   # (B, n)
        out.update(budgets=C, N_opt=percentile_interval(N_b, ci, axis=1),
                   D_opt=percentile_interval(C[:, None] / (6.0 * N_b), ci, axis=1))
    return Bootstrap(**out)


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
