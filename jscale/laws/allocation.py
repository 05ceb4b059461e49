"""Compute-optimal allocation from a fitted Chinchilla law: the closed form under ``C = 6ND`` and the
numerical optimum under any FLOPs-per-token function (e.g. one interpolated through a sweep's runs).
Chinchilla's Approach 2 is in :mod:`jscale.laws.isoflop`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: Numerical N_opt: a bracket of ±BRACKET_DECADES decades around the closed-form optimum, searched on
#: GRID_POINTS log-spaced points, then REFINES more times on a 6× narrower bracket around the best.
BRACKET_DECADES, GRID_POINTS, REFINES = 3.0, 241, 3


def _chinchilla_loss(p: Mapping[str, float], N, D):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def closed_form_n_opt(params: Mapping[str, Any], C) -> np.ndarray:
    """``N_opt(C) = G·(C/6)^(β/(α+β))``, ``G = (αA / (βB))^(1/(α+β))``: the minimiser of
    ``E + A/N^α + B/D^β`` under ``C = 6ND`` (Hoffmann et al. 2022, eq. 4). Broadcasts over arrays of
    parameters (e.g. bootstrap samples) and budgets."""
    alpha, beta = params["alpha"], params["beta"]
    G = (alpha * params["A"] / (beta * params["B"])) ** (1.0 / (alpha + beta))
    return G * (np.asarray(C, float) / 6.0) ** (beta / (alpha + beta))


def compute_optimal(params: Mapping[str, Any], C, flops_per_token: Callable | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(N_opt, D_opt)`` minimising ``E + A/N^α + B/D^β`` at training FLOPs ``C`` with
    ``D = C / flops_per_token(N)``; ``flops_per_token`` maps an array of parameter counts to training
    FLOPs per token (``None``: ``6N``). Vectorised: ``C`` and the parameters (scalars, or arrays such
    as bootstrap samples) broadcast together; NaN parameters give NaN. The result is on a grid of
    spacing ``2·BRACKET_DECADES / (GRID_POINTS − 1) / 6^REFINES`` decades (≈ 1e-4)."""
    C = np.asarray(C, float)
    keys = ("E", "A", "B", "alpha", "beta")
    shape = np.broadcast_shapes(C.shape, *(np.shape(params[k]) for k in keys))
    p = {k: np.broadcast_to(np.asarray(params[k], float), shape).ravel() for k in keys}
    Cf = np.broadcast_to(C, shape).ravel()
    fpt = flops_per_token or (lambda N: 6.0 * np.asarray(N, float))
    with np.errstate(all="ignore"):
        center = np.log10(closed_form_n_opt(p, Cf))            # one per (budget, parameter row)
    valid = np.isfinite(center) & np.all([np.isfinite(v) for v in p.values()], axis=0)
    center = np.where(valid, center, 0.0)
    q = {k: np.where(valid, v, 1.0)[:, None] for k, v in p.items()}
    half = np.full_like(center, BRACKET_DECADES)
    for _ in range(REFINES + 1):
        logN = center[:, None] + np.linspace(-1.0, 1.0, GRID_POINTS)[None, :] * half[:, None]
        N = 10.0 ** logN
        per_token = np.asarray(fpt(N.ravel()), float).reshape(N.shape)
        if np.any(~np.isfinite(per_token)) or np.any(per_token <= 0):
            raise ValueError("flops_per_token: must return finite, positive FLOPs per token")
        L = _chinchilla_loss(q, N, Cf[:, None] / per_token)
        i = np.argmin(L, axis=1)
        center = logN[np.arange(len(center)), i]
        half = half / 6.0
    N_opt = 10.0 ** center
    D_opt = Cf / np.asarray(fpt(N_opt), float)
    N_opt[~valid], D_opt[~valid] = np.nan, np.nan
    return N_opt.reshape(shape), D_opt.reshape(shape)


def interpolated_flops_per_token(n_params: Sequence[float], flops_per_token: Sequence[float]
                                 ) -> Callable[[np.ndarray], np.ndarray]:
    """FLOPs per token as a function of parameter count, interpolated log-log through measured pairs
    (e.g. a sweep's ``n_params_non_embedding`` and ``flops_per_token`` columns) and extrapolated with
    the end segments' slopes."""
    N = np.asarray(n_params, float)
    F = np.asarray(flops_per_token, float)
    if N.shape != F.shape or N.size < 2:
        raise ValueError("n_params, flops_per_token: need ≥ 2 pairs of the same length")
    logN, idx = np.unique(np.log(N), return_index=True)
    logF = np.log(F)[idx]
    if logN.size < 2:
        raise ValueError("n_params: need at least 2 distinct parameter counts")

    def fpt(n):
        x = np.log(np.asarray(n, float))
        y = np.interp(x, logN, logF)
        lo = logF[0] + (x - logN[0]) * (logF[1] - logF[0]) / (logN[1] - logN[0])
        hi = logF[-1] + (x - logN[-1]) * (logF[-1] - logF[-2]) / (logN[-1] - logN[-2])
        return np.exp(np.where(x < logN[0], lo, np.where(x > logN[-1], hi, y)))

    return fpt
