"""Chinchilla's Approach 2: a parabola in log N through each IsoFLOP profile, power laws
``N_opt ∝ C^a`` and ``D_opt ∝ C^b`` through the minima, and a bootstrap of it (runs resampled within
each budget, every resample at once as weight rows).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jscale.laws.uncertainty import percentile_interval


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
    """Chinchilla Approach 2. For each budget C with ≥ 3 model sizes, a parabola
    ``loss = c0 + c1·x + c2·x²`` in ``x = ln N`` (``parabolas[i] = (c0, c1, c2)``) whose minimum gives
    ``N_min[i]``, ``loss_min[i]`` and ``D_min[i]`` (tokens at ``N_min`` on that budget's runs, log-log
    interpolated); then ``N_opt = N_coef·C^a`` and ``D_opt = D_coef·C^b`` fitted by least squares in
    log-log through the minima. ``skipped`` names budgets left out and why."""

    budgets: np.ndarray
    parabolas: np.ndarray
    N_min: np.ndarray
    D_min: np.ndarray
    loss_min: np.ndarray
    a: float
    b: float
    N_coef: float
    D_coef: float
    skipped: dict[float, str]
    runs: dict[str, np.ndarray] = dataclasses.field(repr=False)   # N, D, loss, budget used

    @property
    def outside(self) -> np.ndarray:
        """Per budget: is the parabola's minimum outside the range of sizes trained (extrapolated)?"""
        r = self.runs
        return np.array([not (r["N"][r["budget"] == C].min() <= n <= r["N"][r["budget"] == C].max())
                         for C, n in zip(self.budgets, self.N_min, strict=True)])

    def N_opt(self, C) -> np.ndarray:
        """Compute-optimal parameters at budget ``C`` from the fitted power law."""
        return self.N_coef * np.asarray(C, float) ** self.a

    def D_opt(self, C) -> np.ndarray:
        """Compute-optimal tokens at budget ``C`` from the fitted power law."""
        return self.D_coef * np.asarray(C, float) ** self.b

    def to_dict(self) -> dict[str, Any]:
        return {"approach": 2, "a": self.a, "b": self.b, "N_coef": self.N_coef,
                "D_coef": self.D_coef,
                "minima": [{"budget": float(c), "N": float(n), "D": float(d), "loss": float(lo),
                            "outside_sampled_sizes": bool(o)}
                           for c, n, d, lo, o in zip(self.budgets, self.N_min, self.D_min,
                                                     self.loss_min, self.outside, strict=True)],
                "skipped": {f"{k:g}": v for k, v in self.skipped.items()}}


def _weighted_fit(X, y, w, need: int):
    """Weighted least squares ``y ≈ X c`` for each row of weights ``w`` (R, n); rows whose positive
    weights cover fewer than ``need`` distinct points (a bootstrap resample can) give NaN."""
    XtWX = np.einsum("rn,ni,nj->rij", w, X, X)
    XtWy = np.einsum("rn,ni,n->ri", w, X, y)
    distinct = np.array([np.unique(X[row > 0, 1]).size for row in w])
    ok = distinct >= need
    XtWX[~ok] = np.eye(X.shape[1])
    c = np.linalg.solve(XtWX, XtWy[..., None])[..., 0]
    c[~ok] = np.nan
    return c


def _weighted_parabolas(x, y, w):
    """Least-squares parabolas ``y ≈ c0 + c1 x + c2 x²`` for each row of weights ``w`` (R, n)."""
    return _weighted_fit(np.stack([np.ones_like(x), x, x * x], -1), y, w, 3)


def _weighted_line(x, y, w):
    """Least-squares lines ``y ≈ k0 + k1 x`` for each row of weights ``w`` (R, n)."""
    return _weighted_fit(np.stack([np.ones_like(x), x], -1), y, w, 2)


def _lines(x, Y):
    """Least-squares lines ``Y[r] ≈ k0 + k1·x`` for each row of ``Y`` (R, n): ``(R, 2)``."""
    xc = x - x.mean()
    k1 = (Y - Y.mean(1, keepdims=True)) @ xc / (xc @ xc)
    return np.stack([Y.mean(1) - k1 * x.mean(), k1], 1)


def _minima(x_lnN, lnD, loss, w):
    """Per weight row: parabola, its minimum N, loss and (log-log interpolated) D."""
    c = _weighted_parabolas(x_lnN, loss, w)                            # (R, 3)
    with np.errstate(all="ignore"):
        x_star = -c[:, 1] / (2.0 * c[:, 2])
        line = _weighted_line(x_lnN, lnD, w)
    valid = (c[:, 2] > 0) & np.isfinite(x_star)
    loss_star = c[:, 0] + c[:, 1] * x_star + c[:, 2] * x_star ** 2
    lnD_star = line[:, 0] + line[:, 1] * x_star
    return c, np.where(valid, x_star, np.nan), np.where(valid, lnD_star, np.nan), loss_star


def fit_isoflop(N, D, loss, budget) -> IsoFlopFit:
    """Chinchilla Approach 2 on IsoFLOP runs: ``N`` parameters, ``D`` tokens, final ``loss`` and the
    ``budget`` (training FLOPs) each run belongs to. Needs ≥ 2 budgets with ≥ 3 distinct sizes and an
    upward parabola."""
    N, D, loss, budget = (np.asarray(a, float).ravel() for a in (N, D, loss, budget))
    if not N.size == D.size == loss.size == budget.size:
        raise ValueError("N, D, loss, budget: must have the same length")
    budgets, c_rows, n_min, d_min, l_min = [], [], [], [], []
    skipped: dict[float, str] = {}
    for C in np.unique(budget):
        sel = budget == C
        if np.unique(N[sel]).size < 3:
            skipped[float(C)] = f"{np.unique(N[sel]).size} model sizes (need ≥ 3)"
            continue
        c, x_star, lnD_star, l_star = _minima(np.log(N[sel]), np.log(D[sel]), loss[sel],
                                              np.ones((1, int(sel.sum()))))
        if not np.isfinite(x_star[0]):
            skipped[float(C)] = "loss vs log N is not convex (no minimum)"
            continue
        budgets.append(C)
        c_rows.append(c[0])
        n_min.append(math.exp(x_star[0]))
        d_min.append(math.exp(lnD_star[0]))
        l_min.append(l_star[0])
    if len(budgets) < 2:
        raise ValueError(f"budget: Approach 2 needs ≥ 2 budgets with ≥ 3 sizes and a minimum; "
                         f"usable: {[f'{b:g}' for b in budgets]}, skipped: {skipped}")
    lnC = np.log(budgets)
    kN, kD = _lines(lnC, np.log([n_min, d_min]))
    keep = np.isin(budget, budgets)
    return IsoFlopFit(budgets=np.array(budgets), parabolas=np.array(c_rows), N_min=np.array(n_min),
                      D_min=np.array(d_min), loss_min=np.array(l_min), a=float(kN[1]),
                      b=float(kD[1]), N_coef=float(math.exp(kN[0])), D_coef=float(math.exp(kD[0])),
                      skipped=skipped, runs={"N": N[keep], "D": D[keep], "loss": loss[keep],
                                             "budget": budget[keep]})


@dataclasses.dataclass(frozen=True)
class IsoFlopBootstrap:
    """Bootstrap of Approach 2 (runs resampled within each budget): per-resample ``samples`` and
    percentile ``intervals`` of ``a``, ``b``, ``N_coef``, ``D_coef``, and intervals of ``N_opt`` /
    ``D_opt`` at ``budgets`` (shape (len(budgets), 2))."""

    n: int
    ci: float
    samples: dict[str, np.ndarray] = dataclasses.field(repr=False)
    intervals: dict[str, tuple[float, float]]
    budgets: np.ndarray
    N_opt: np.ndarray
    D_opt: np.ndarray
    n_failed: int

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "ci": self.ci, "n_failed": self.n_failed,
                "intervals": {k: list(v) for k, v in self.intervals.items()},
                "budgets": self.budgets.tolist(), "N_opt": self.N_opt.tolist(),
                "D_opt": self.D_opt.tolist()}


def bootstrap_isoflop(iso: IsoFlopFit, n: int = 1000, *, seed: int = 0, ci: float = 0.95,
                      budgets: Sequence[float] | None = None) -> IsoFlopBootstrap:
    """Resample each budget's runs with replacement ``n`` times (all resamples at once, as weight
    rows) and redo Approach 2 on each; resamples where a parabola has no minimum are dropped."""
    if n < 2:
        raise ValueError(f"n: need at least 2 bootstrap resamples (got {n})")
    rng = np.random.default_rng(seed)
    r = iso.runs
    lnN, lnD = np.zeros((n, len(iso.budgets))), np.zeros((n, len(iso.budgets)))
    for j, C in enumerate(iso.budgets):
        sel = r["budget"] == C
        m = int(sel.sum())
        w = rng.multinomial(m, np.full(m, 1.0 / m), size=n).astype(float)
        _, x_star, lnD_star, _ = _minima(np.log(r["N"][sel]), np.log(r["D"][sel]), r["loss"][sel], w)
        lnN[:, j], lnD[:, j] = x_star, lnD_star
    ok = np.all(np.isfinite(lnN) & np.isfinite(lnD), axis=1)
    lnC = np.log(iso.budgets)
    kN, kD = _lines(lnC, np.where(ok[:, None], lnN, 0.0)), _lines(lnC, np.where(ok[:, None], lnD, 0.0))
    a = np.where(ok, kN[:, 1], np.nan)
    b = np.where(ok, kD[:, 1], np.nan)
    C_eval = np.asarray(iso.budgets if budgets is None else budgets, float)
    N_b = np.exp(kN[:, :1] + kN[:, 1:] * np.log(C_eval)[None, :])   # (n, budgets)
    D_b = np.exp(kD[:, :1] + kD[:, 1:] * np.log(C_eval)[None, :])
    N_b[~ok], D_b[~ok] = np.nan, np.nan
    samples = {"a": a, "b": b, "N_coef": np.where(ok, np.exp(kN[:, 0]), np.nan),
               "D_coef": np.where(ok, np.exp(kD[:, 0]), np.nan)}
    return IsoFlopBootstrap(
        n=n, ci=ci, samples=samples,
        intervals={k: tuple(float(x) for x in percentile_interval(v, ci)) for k, v in samples.items()},
        budgets=C_eval, N_opt=percentile_interval(N_b, ci, axis=0),
        D_opt=percentile_interval(D_b, ci, axis=0), n_failed=int(np.sum(~ok)))
