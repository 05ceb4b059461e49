"""Scaling laws: forms, robust many-start fitting, compute-optimal allocation, uncertainty.

* Forms (pure functions of parameters and inputs): :func:`chinchilla`, :func:`power_law`,
  :func:`parscale`, :func:`routed_lm` (Clark et al. 2022); fitted as :class:`Law` objects
  :data:`CHINCHILLA`, :data:`POWER_LAW`, :data:`PARSCALE`, :data:`ROUTED_LM`, or any JAX function
  via :func:`fit`.
* Fitting like Chinchilla's Approach 3: :func:`fit_chinchilla`, :func:`fit_parscale`,
  :func:`fit_power_law`, :func:`fit` — Huber loss on log residuals, every starting point of a grid
  optimised at once by a vectorised fixed-iteration damped Newton method.
* Allocation: :class:`ChinchillaFit` ``.N_opt(C)``, ``.D_opt(C)``, ``.compute_optimal(C, fpt)``
  (``fpt``: FLOPs per token as a function of N, e.g. :func:`interpolated_flops_per_token` through a
  sweep's runs); Approach 2
  :func:`fit_isoflop` (:mod:`jscale.laws.isoflop`).
* Uncertainty and checks: :func:`bootstrap` (every resample refitted from its own multistart;
  allocation intervals under 6ND or a FLOPs-per-token function), :func:`bootstrap_isoflop`,
  :func:`extrapolation_check`.
* Published data to reproduce: :mod:`jscale.laws.published`.
* From a sweep's results table to fits, a summary, ``fit.json`` and plots: :mod:`jscale.laws.report`
  (returns the fit objects); the figures: :mod:`jscale.laws.plots` (imported on demand: matplotlib).

Pure math on tables and arrays: this package imports nothing from ``jscale.sweep``,
``jscale.models`` or ``jscale.cli``.
"""

from jscale.laws import published
from jscale.laws.allocation import closed_form_n_opt, compute_optimal, interpolated_flops_per_token
from jscale.laws.fitted import ChinchillaFit, FitResult
from jscale.laws.fitting import (
    HUBER_DELTA,
    default_stages,
    fit,
    fit_chinchilla,
    fit_parscale,
    fit_power_law,
)
from jscale.laws.forms import (
    CHINCHILLA,
    CHINCHILLA_GRID,
    LAWS,
    PARSCALE,
    PARSCALE_GRID,
    POWER_LAW,
    ROUTED_LM,
    ROUTED_LM_GRID,
    Law,
    chinchilla,
    grid_points,
    parscale,
    power_law,
    routed_lm,
    user_law,
)
from jscale.laws.isoflop import IsoFlopBootstrap, IsoFlopFit, bootstrap_isoflop, fit_isoflop
from jscale.laws.optimize import Stage, huber
from jscale.laws.uncertainty import (
    BOOTSTRAP_RESAMPLES,
    FLOPS_PER_TOKEN,
    SIX_ND,
    Bootstrap,
    Extrapolation,
    allocation_samples,
    bootstrap,
    extrapolation_check,
    percentile_interval,
)

__all__ = [
    "BOOTSTRAP_RESAMPLES", "CHINCHILLA", "CHINCHILLA_GRID", "FLOPS_PER_TOKEN", "HUBER_DELTA", "LAWS",
    "PARSCALE", "PARSCALE_GRID", "POWER_LAW", "ROUTED_LM", "ROUTED_LM_GRID", "SIX_ND", "Bootstrap",
    "ChinchillaFit", "Extrapolation",
    "FitResult", "IsoFlopBootstrap", "IsoFlopFit", "Law", "Stage", "allocation_samples", "bootstrap",
    "bootstrap_isoflop",
    "chinchilla", "closed_form_n_opt", "compute_optimal", "default_stages", "extrapolation_check",
    "fit", "fit_chinchilla", "fit_isoflop", "fit_parscale",
    "fit_power_law", "grid_points", "huber", "interpolated_flops_per_token", "parscale",
    "percentile_interval", "power_law", "published", "routed_lm", "user_law",
]
