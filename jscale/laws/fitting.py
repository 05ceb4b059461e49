"""Fitting laws to runs the way Chinchilla's Approach 3 does: Huber loss on log-loss residuals, from a
grid of starting points, every start optimised at once (see :mod:`jscale.laws.optimize`). Bootstrap
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
from jscale.laws.allocation import closed_form_n_opt
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
# results


@dataclasses.dataclass(frozen=True)
class FitResult:
    """A fitted law. The reported parameters are attributes (``fit.E``, ``fit.alpha`` …) and
    ``fit.params``; ``theta`` holds them in the fitted parametrisation (e.g. ``a = log A``).

    ``minima`` holds the best distinct minima and ``candidates`` every start after each stage (the
    bootstrap's candidate starts), as rows of ``theta``. ``objective`` is the summed Huber loss at
    the optimum; ``r2`` and ``rmse`` compare predicted and observed loss (not log loss);
    ``n_converged`` of ``n_starts`` starting points ended within ``CONVERGED_RTOL`` of the best
    objective (starts dropped by a screening stage count as not converged); ``converged`` says
    whether the best start's last iterations still improved it.
    """

    law: Law = dataclasses.field(repr=False)
    params: dict[str, float]
    theta: dict[str, float]
    objective: float
    r2: float
    rmse: float
    n_points: int
    n_starts: int
    n_converged: int
    converged: bool
    delta: float
    inputs: dict[str, np.ndarray] = dataclasses.field(repr=False)
    loss: np.ndarray = dataclasses.field(repr=False)
    minima: np.ndarray = dataclasses.field(repr=False)   # distinct best minima (theta rows)
    #: every start after each optimisation stage (theta rows, finite objective): the bootstrap's
    #: candidate starts
    candidates: np.ndarray = dataclasses.field(repr=False, default_factory=lambda: np.zeros((0, 0)))

    def __getattr__(self, name: str) -> float:
        if name.startswith("_") or name in ("params", "__dataclass_fields__"):
            raise AttributeError(name)
        try:
            return self.params[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} "
                                 f"(fitted parameters: {list(self.params)})") from None

    def predict(self, *args, **kwargs) -> np.ndarray:
        """Predicted loss at the given inputs, positionally in ``law.inputs`` order or by name."""
        x = _inputs_dict(self.law, args, kwargs, "predict")
        return predict_theta(self.law, self.theta, x)

    def residuals(self) -> np.ndarray:
        """``log(observed) − log(predicted)`` on the fitted points."""
        return np.log(self.loss) - np.log(self.predict(**self.inputs))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: law, formula, parameters, objective and fit statistics."""
        return {"law": self.law.name, "formula": self.law.formula,
                "params": dict(self.params), "theta": dict(self.theta),
                "objective": self.objective, "r2": self.r2, "rmse": self.rmse,
                "n_points": self.n_points, "n_starts": self.n_starts,
                "n_converged": self.n_converged, "converged": self.converged,
                "huber_delta": self.delta}


@dataclasses.dataclass(frozen=True)
class ChinchillaFit(FitResult):
    """A fitted ``L = E + A/N^α + B/D^β`` with compute-optimal allocation.

    Under ``C = 6ND`` the optimum is closed-form: ``N_opt = G·(C/6)^a``, ``D_opt = G⁻¹·(C/6)^b`` with
    ``G = (αA / (βB))^(1/(α+β))``, ``a = β/(α+β)``, ``b = α/(α+β)`` (Hoffmann et al. 2022, eq. 4).
    :meth:`compute_optimal` solves it numerically for any FLOPs-per-token function instead.
    """

    @property
    def a(self) -> float:
        """Exponent of ``N_opt ∝ C^a``: ``β/(α+β)``."""
        return self.params["beta"] / (self.params["alpha"] + self.params["beta"])

    @property
    def b(self) -> float:
        """Exponent of ``D_opt ∝ C^b``: ``α/(α+β)``."""
        return self.params["alpha"] / (self.params["alpha"] + self.params["beta"])

    def N_opt(self, C) -> np.ndarray:
        """Compute-optimal parameters for training FLOPs ``C`` under ``C = 6ND`` (closed form)."""
        return closed_form_n_opt(self.params, np.asarray(C, float))

    def D_opt(self, C) -> np.ndarray:
        """Compute-optimal tokens for training FLOPs ``C`` under ``C = 6ND`` (closed form)."""
        C = np.asarray(C, float)
        return C / (6.0 * self.N_opt(C))

    def compute_optimal(self, C, flops_per_token: Callable[[np.ndarray], np.ndarray] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """``(N_opt, D_opt)`` for budgets ``C``, minimising the fitted loss over N with
        ``D = C / flops_per_token(N)`` (training FLOPs per token of a model of N parameters, e.g.
        :func:`jscale.laws.family_flops_per_token`); ``None`` means ``6N`` (then it equals the closed
        form). Numerical: a log-spaced bracket around the closed-form optimum, refined twice."""
        from jscale.laws.allocation import compute_optimal
        return compute_optimal(self.params, C, flops_per_token)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["exponents"] = {"a": self.a, "b": self.b}
        return d


# ---------------------------------------------------------------------------------------------------
# fitting


def _inputs_dict(law: Law, args, kwargs, where: str) -> dict[str, np.ndarray]:
    if args and kwargs:
        raise TypeError(f"{where}: pass the inputs {list(law.inputs)} positionally or by name, not both")
    if args:
        if len(args) != len(law.inputs):
            raise TypeError(f"{where}: expected {len(law.inputs)} inputs {list(law.inputs)}, "
                            f"got {len(args)}")
        kwargs = dict(zip(law.inputs, args, strict=True))
    missing = [k for k in law.inputs if k not in kwargs]
    extra = [k for k in kwargs if k not in law.inputs]
    if missing or extra:
        raise TypeError(f"{where}: inputs must be exactly {list(law.inputs)} "
                        f"(missing {missing}, unknown {extra})")
    arrays = [np.asarray(kwargs[k], float) for k in law.inputs]
    arrays = np.broadcast_arrays(*arrays)
    return {k: np.asarray(a, float) for k, a in zip(law.inputs, arrays, strict=True)}


def predict_theta(law: Law, theta: Mapping[str, float], inputs: Mapping[str, np.ndarray]
                  ) -> np.ndarray:
    """``exp(law.log_predict(theta, inputs))`` in float64, as numpy."""
    shape = np.broadcast_shapes(*(np.shape(v) for v in inputs.values()))
    with jax.enable_x64(True):
        x = {k: jnp.asarray(np.broadcast_to(v, shape).ravel(), jnp.float64)
             for k, v in inputs.items()}
        t = {k: jnp.asarray(v, jnp.float64) for k, v in theta.items()}
        out = np.exp(np.asarray(_jitted(law, "log_predict")(t, x)))
    return out.reshape(shape)


_JITTED: dict[tuple[int, str], tuple[Law, Callable]] = {}


def _jitted(law: Law, what: str) -> Callable:
    """``jax.jit`` of ``law.log_predict`` ("log_predict"), ``law.to_public`` ("public") or of
    ``log_predict`` vmapped over rows of theta ("rows"), one per Law object."""
    hit = _JITTED.get((id(law), what))
    if hit is None or hit[0] is not law:
        if what == "rows":
            def fn(theta_SP, x):
                return jax.vmap(lambda t: law.log_predict(dict(zip(law.params, t, strict=True)),
                                                          x))(theta_SP)
        else:
            fn = law.log_predict if what == "log_predict" else law.to_public
        hit = (law, jax.jit(fn))
        _JITTED[(id(law), what)] = hit
    return hit[1]


def _log_predict_rows(law: Law, theta_SP: np.ndarray, inputs: Mapping[str, np.ndarray]
                      ) -> np.ndarray:
    """``law.log_predict`` of every row of ``theta_SP`` at the points ``inputs``: ``(S, N)``, float64."""
    with jax.enable_x64(True):
        x = {k: jnp.asarray(v, jnp.float64) for k, v in inputs.items()}
        return np.asarray(_jitted(law, "rows")(jnp.asarray(theta_SP, jnp.float64), x))


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


def _public(law: Law, theta: Mapping[str, Any]) -> dict[str, Any]:
    """``law.to_public`` in float64 (scalars → floats, arrays → numpy arrays)."""
    with jax.enable_x64(True):
        out = _jitted(law, "public")({k: jnp.asarray(v, jnp.float64) for k, v in theta.items()})
        out = {k: np.asarray(v, np.float64) for k, v in out.items()}
    return {k: float(v) if v.ndim == 0 else v for k, v in out.items()}


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
