"""Scaling-law forms: pure functions of (parameters, inputs), and :class:`Law`, the form plus the way
it is fitted (its optimisation parametrisation, bounds and default grid of starting points).

The plain forms take the *reported* parameters (``E``, ``A``, ``alpha`` …) and return the loss:

* :func:`chinchilla` ``L = E + A/N^α + B/D^β`` (Hoffmann et al. 2022)
* :func:`power_law` ``L = E + A/x^α``
* :func:`parscale` ``L = (A / (N·(k·ln P + 1)))^α + E`` (Chen et al. 2025, arXiv 2505.10475)
* :func:`routed_lm` ``log₁₀ L = a·log₁₀ N + b·log₁₀ E + c·log₁₀ N·log₁₀ E + d`` (Clark et al. 2022,
  "Unified Scaling Laws for Routed Language Models", arXiv 2202.01169, Eq. 1)

A :class:`Law` is what the fitter optimises: ``log_predict(theta, inputs)`` returns log L in terms of
the *fitted* parameters ``theta`` (for Chinchilla the log-sum-exp parametrisation
``log L = LSE(a − α·log N, b − β·log D, e)`` with ``A = eᵃ``, ``B = eᵇ``, ``E = eᵉ``, as Chinchilla's
Approach 3 and Epoch AI's replication fit it), and ``public(theta)`` maps them to the reported ones.
Any JAX function ``law(params, *inputs) -> loss`` can be fitted too (:func:`user_law`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

Array = Any

# ---------------------------------------------------------------------------------------------------
# the forms, in reported parameters


def chinchilla(params: Mapping[str, Array], N: Array, D: Array) -> Array:
    """``L = E + A/N^α + B/D^β`` with ``params`` ``{E, A, B, alpha, beta}``; N parameters, D tokens."""
    return params["E"] + params["A"] / N ** params["alpha"] + params["B"] / D ** params["beta"]


def power_law(params: Mapping[str, Array], x: Array) -> Array:
    """``L = E + A/x^α`` with ``params`` ``{E, A, alpha}``."""
    return params["E"] + params["A"] / x ** params["alpha"]


def parscale(params: Mapping[str, Array], N: Array, P: Array) -> Array:
    """ParScale's law ``L = (A / (N·(k·ln P + 1)))^α + E`` with ``params`` ``{E, A, alpha, k}``;
    N non-embedding parameters (including ParScale's prefix and aggregator parameters), P streams."""
    return (params["A"] / (N * (params["k"] * jnp.log(P) + 1.0))) ** params["alpha"] + params["E"]


def routed_lm(params: Mapping[str, Array], N: Array, E: Array) -> Array:
    """Clark et al. (2022)'s routed-LM law ``log₁₀ L = a·log₁₀ N + b·log₁₀ E + c·log₁₀ N·log₁₀ E + d``
    with ``params`` ``{a, b, c, d}``; N the *dense* parameter count (parameters one token uses —
    the source data's ``dense_parameter_count``, not the total with every expert), E experts per
    routed layer (E = 1: the dense model).

    Conventions (those of the authors' released notebook, google-deepmind/scaling_laws_for_routing
    ``example.ipynb``): base-10 logs, N and E unnormalised. (That notebook also fits the paper's
    saturating transform of E, ``Ê(E; E_start, E_max)``; this is the plain law with ``Ê = E``.)
    The fitted surface does not depend on them, only the constants do: in natural
    logs ``ln L = a·ln N + b·ln E + (c/ln 10)·ln N·ln E + d·ln 10`` (a, b unchanged); with N in units
    of ``s`` (``N' = N/s``) ``b' = b + c·log₁₀ s`` and ``d' = d + a·log₁₀ s`` (a, c unchanged)."""
    lN, lE = jnp.log10(N), jnp.log10(E)
    return 10.0 ** (params["a"] * lN + params["b"] * lE + params["c"] * lN * lE + params["d"])


# ---------------------------------------------------------------------------------------------------
# Law: a form plus its fitting parametrisation


@dataclasses.dataclass(frozen=True, kw_only=True)
class Law:
    """A scaling law as the fitter sees it.

    * ``inputs``: names of the input arrays in order (``("N", "D")``).
    * ``params``: names of the fitted parameters ``theta`` in order.
    * ``log_predict(theta, inputs)``: log of the predicted loss; ``theta`` and ``inputs`` are dicts of
      arrays (JAX-traceable, elementwise over the points).
    * ``public(theta)``: the reported parameters (e.g. ``A = exp(a)``); identity by default.
    * ``bounds``: ``{name: (low, high)}`` box bounds on fitted parameters (others are free).
    * ``grid``: default starting points, ``{name: values}``, the Cartesian product of the values.
    * ``lse``: optional structure for the fast path: ``lse(inputs) -> (G_UMQ, h_UM)`` when
      ``log_predict = LSE_k(G_k·theta + h_k)`` is a log-sum-exp of terms linear in ``theta`` (the
      fitter then computes exact gradients and Hessians in closed form, as matrix products).
    * ``strata``: optional ``strata(theta_IQ, loss_M) -> labels_I`` (integers): bins of parameter
      space along which the fit is poorly identified — the bootstrap refits each resample from the
      best candidate starts of every bin, so that a resample whose optimum lies in another bin than
      the full fit's still finds it (for Chinchilla: E as a fraction of the smallest loss; the
      ``E → 0`` plateau of the ``e = log E`` parametrisation is flat, so a start on it never leaves).
    """

    name: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    log_predict: Callable[[Mapping[str, Array], Mapping[str, Array]], Array]
    public: Callable[[Mapping[str, Array]], dict[str, Array]] | None = None
    bounds: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    grid: Mapping[str, Sequence[float]] | None = None
    lse: Callable[[Mapping[str, Array]], tuple[Array, Array]] | None = None
    formula: str = ""
    strata: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    def __post_init__(self):
        if len(set(self.params)) != len(self.params) or not self.params:
            raise ValueError(f"Law {self.name!r}: params must be distinct and non-empty "
                             f"(got {self.params})")
        unknown = set(self.bounds) - set(self.params)
        if unknown:
            raise ValueError(f"Law {self.name!r}: bounds name unknown params {sorted(unknown)} "
                             f"(params: {list(self.params)})")
        for k, (lo, hi) in self.bounds.items():
            if not lo < hi:
                raise ValueError(f"Law {self.name!r}: bounds[{k!r}] must have low < high "
                                 f"(got {(lo, hi)})")

    def to_public(self, theta: Mapping[str, Array]) -> dict[str, Array]:
        """The reported parameters for fitted parameters ``theta``."""
        return dict(theta) if self.public is None else self.public(theta)

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` bound vectors in ``params`` order (±inf where unbounded)."""
        lo = np.array([self.bounds.get(p, (-np.inf, np.inf))[0] for p in self.params], float)
        hi = np.array([self.bounds.get(p, (-np.inf, np.inf))[1] for p in self.params], float)
        return lo, hi


def grid_points(law: Law, grid: Mapping[str, Sequence[float]] | np.ndarray | None = None
                ) -> np.ndarray:
    """Starting points as an ``(I, len(law.params))`` array: the Cartesian product of ``grid``'s
    values (default ``law.grid``), or ``grid`` itself when it is already such an array."""
    grid = law.grid if grid is None else grid
    if grid is None:
        raise ValueError(f"init_grid: law {law.name!r} has no default grid; pass init_grid="
                         f"{{name: values}} for each of {list(law.params)}")
    if isinstance(grid, np.ndarray | jnp.ndarray):
        pts = np.asarray(grid, float)
        if pts.ndim != 2 or pts.shape[1] != len(law.params):
            raise ValueError(f"init_grid: an array of starts must have shape (I, {len(law.params)}) "
                             f"for params {list(law.params)} (got {pts.shape})")
        return pts
    missing = [p for p in law.params if p not in grid]
    extra = [k for k in grid if k not in law.params]
    if missing or extra:
        raise ValueError(f"init_grid: needs exactly the keys {list(law.params)} "
                         f"(missing {missing}, unknown {extra})")
    values = [np.atleast_1d(np.asarray(grid[p], float)) for p in law.params]
    if any(v.size == 0 for v in values):
        raise ValueError("init_grid: every parameter needs at least one starting value")
    return np.array(list(itertools.product(*values)), float)


# ---------------------------------------------------------------------------------------------------
# built-in laws


def _lse(*terms):
    stacked = jnp.stack(jnp.broadcast_arrays(*terms))
    return _logsumexp0(stacked)


def _logsumexp0(u):
    mx = jnp.max(u, axis=0)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    return mx + jnp.log(jnp.sum(jnp.exp(u - mx), axis=0))


#: Chinchilla Approach 3's grid as Hoffmann et al. and Epoch AI use it: 5·5·5·6·6 = 4,500 starts.
CHINCHILLA_GRID = {
    "a": np.arange(0.0, 30.0, 5.0),      # 0, 5, …, 25
    "b": np.arange(0.0, 30.0, 5.0),
    "e": np.arange(-1.0, 1.5, 0.5),      # -1, -.5, …, 1
    "alpha": np.arange(0.0, 2.5, 0.5),   # 0, .5, …, 2
    "beta": np.arange(0.0, 2.5, 0.5),
}


def _chinchilla_log(theta, x):
    return _lse(theta["a"] - theta["alpha"] * jnp.log(x["N"]),
                theta["b"] - theta["beta"] * jnp.log(x["D"]), theta["e"])


def _chinchilla_lse(x):
    logN, logD = np.log(np.asarray(x["N"], float)), np.log(np.asarray(x["D"], float))
    n = logN.shape[0]
    G = np.zeros((3, n, 5))              # theta = (a, b, e, alpha, beta)
    G[0, :, 0], G[0, :, 3] = 1.0, -logN  # a − α·log N
    G[1, :, 1], G[1, :, 4] = 1.0, -logD  # b − β·log D
    G[2, :, 2] = 1.0                     # e
    return G, np.zeros((3, n))


#: Bootstrap strata of laws with an irreducible term ``E = exp(e)``: bin edges of E as a fraction of
#: the smallest observed loss (E → 0 falls in the first bin, E near the loss floor in the last).
E_STRATA = (0.001, 0.01, 0.1, 0.25, 0.45, 0.7)


def _e_strata(index: int):
    def strata(theta: np.ndarray, loss: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            frac = np.exp(np.asarray(theta, float)[:, index]) / np.min(loss)
        return np.digitize(frac, E_STRATA)
    return strata


def _exp_abe(theta):
    return {"E": jnp.exp(theta["e"]), "A": jnp.exp(theta["a"]), "B": jnp.exp(theta["b"]),
            "alpha": theta["alpha"], "beta": theta["beta"]}


#: Lower bound of ``e = log E`` in the log-sum-exp laws: ``E ≥ 1e-30`` is zero next to any loss, and
#: keeps a fit on the ``E → 0`` plateau finite (each step along it would otherwise run e to −∞).
LOG_E_MIN = math.log(1e-30)

CHINCHILLA = Law(
    name="chinchilla", inputs=("N", "D"), params=("a", "b", "e", "alpha", "beta"),
    bounds={"e": (LOG_E_MIN, np.inf)},
    log_predict=_chinchilla_log, public=_exp_abe, grid=CHINCHILLA_GRID, lse=_chinchilla_lse,
    formula="L = E + A/N^alpha + B/D^beta", strata=_e_strata(2))

#: Grid for the single power law with offset (the Chinchilla grid restricted to its terms).
POWER_LAW_GRID = {"a": CHINCHILLA_GRID["a"], "e": CHINCHILLA_GRID["e"],
                  "alpha": CHINCHILLA_GRID["alpha"]}


def _power_log(theta, x):
    return _lse(theta["a"] - theta["alpha"] * jnp.log(x["x"]), theta["e"])


def _power_lse(x):
    logx = np.log(np.asarray(x["x"], float))
    n = logx.shape[0]
    G = np.zeros((2, n, 3))              # theta = (a, e, alpha)
    G[0, :, 0], G[0, :, 2] = 1.0, -logx
    G[1, :, 1] = 1.0
    return G, np.zeros((2, n))


POWER_LAW = Law(
    name="power_law", inputs=("x",), params=("a", "e", "alpha"), log_predict=_power_log,
    bounds={"e": (LOG_E_MIN, np.inf)},
    public=lambda t: {"E": jnp.exp(t["e"]), "A": jnp.exp(t["a"]), "alpha": t["alpha"]},
    grid=POWER_LAW_GRID, lse=_power_lse, formula="L = E + A/x^alpha", strata=_e_strata(1))

#: ParScale's ``parametric_fit.py`` fits A in units of 1e9 (``A·1e9 / (N·(k·ln P + 1))``).
PARSCALE_A_UNIT = 1e9
#: ParScale's grid: E ∈ e^{-1, -.5, 0}, A ∈ e^{-4, -2, 0, 2, 4} (×1e9), α ∈ {0, …, 2}, k ∈ {.2, …, .8}.
PARSCALE_GRID = {
    "E": np.exp([-1.0, -0.5, 0.0]),
    "A": np.exp([-4.0, -2.0, 0.0, 2.0, 4.0]),
    "alpha": np.array([0.0, 0.5, 1.0, 1.5, 2.0]),
    "k": np.array([0.2, 0.4, 0.6, 0.8]),
}
#: ParScale's bounds: every parameter ≥ 1e-8.
PARSCALE_LOWER = 1e-8


def _parscale_log(theta, x):
    return jnp.log(parscale({**theta, "A": theta["A"] * PARSCALE_A_UNIT}, x["N"], x["P"]))


PARSCALE = Law(
    name="parscale", inputs=("N", "P"), params=("E", "A", "alpha", "k"),
    log_predict=_parscale_log,
    public=lambda t: {"E": t["E"], "A": t["A"] * PARSCALE_A_UNIT, "alpha": t["alpha"], "k": t["k"]},
    bounds={p: (PARSCALE_LOWER, np.inf) for p in ("E", "A", "alpha", "k")}, grid=PARSCALE_GRID,
    formula="L = (A / (N (k ln P + 1)))^alpha + E")


#: Starting points for the routed-LM law. ``log L`` is linear in ``(a, b, c, d)``, so its Huber
#: objective is convex and every start reaches the same optimum; a few starts only check that.
ROUTED_LM_GRID = {"a": [-0.1, 0.0], "b": [-0.1, 0.0], "c": [0.0, 0.01], "d": [0.0, 1.0]}


def _routed_log(theta, x):
    lN, lE = jnp.log10(x["N"]), jnp.log10(x["E"])
    return _LN10 * (theta["a"] * lN + theta["b"] * lE + theta["c"] * lN * lE + theta["d"])


def _routed_lse(x):
    lN = np.log10(np.asarray(x["N"], float))
    lE = np.log10(np.asarray(x["E"], float))
    G = _LN10 * np.stack([lN, lE, lN * lE, np.ones_like(lN)], axis=-1)[None]   # one linear term
    return G, np.zeros((1, lN.shape[0]))


_LN10 = math.log(10.0)

#: Clark et al. (2022)'s routed-LM law, fitted in its reported parameters (base-10 logs, N and E
#: unnormalised: see :func:`routed_lm`). The fitter's residuals are natural-log (``ln L − ln L̂``).
ROUTED_LM = Law(
    name="routed_lm", inputs=("N", "E"), params=("a", "b", "c", "d"), log_predict=_routed_log,
    grid=ROUTED_LM_GRID, lse=_routed_lse,
    formula="log10 L = a log10 N + b log10 E + c log10 N log10 E + d")


def user_law(fn: Callable[..., Array], params: Sequence[str], inputs: Sequence[str], *,
             bounds: Mapping[str, tuple[float, float]] | None = None,
             grid: Mapping[str, Sequence[float]] | None = None, name: str | None = None) -> Law:
    """Wrap a JAX function ``fn(params_dict, *inputs) -> loss`` (positive) as a :class:`Law` fitted
    directly in its own parameters (Huber loss on ``log loss − log fn``)."""
    names = tuple(inputs)

    def log_predict(theta, x):
        return jnp.log(fn(dict(theta), *(x[k] for k in names)))

    return Law(name=name or getattr(fn, "__name__", "law"), inputs=names, params=tuple(params),
               log_predict=log_predict, bounds=dict(bounds or {}), grid=grid)


LAWS = {"chinchilla": CHINCHILLA, "power_law": POWER_LAW, "parscale": PARSCALE,
        "routed_lm": ROUTED_LM}
