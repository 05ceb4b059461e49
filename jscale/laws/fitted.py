"""Fitted laws: :class:`FitResult` (any law) and :class:`ChinchillaFit` (with compute-optimal
allocation), and evaluating a :class:`~jscale.laws.forms.Law` at given parameters — in float64 inside
a scoped ``jax.enable_x64``, one jitted kernel per law. The fitter is :mod:`jscale.laws.fitting`.

Glossary: I parameter rows (starts, or start × resample pairs), M data points.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jscale.laws.allocation import closed_form_n_opt, compute_optimal
from jscale.laws.forms import Law


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
        :func:`jscale.laws.interpolated_flops_per_token` through a sweep's runs); ``None`` means
        ``6N`` (then it equals the closed form). Numerical: a log-spaced bracket around the
        closed-form optimum, refined twice."""
        return compute_optimal(self.params, C, flops_per_token)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["exponents"] = {"a": self.a, "b": self.b}
        return d


# ---------------------------------------------------------------------------------------------------
# evaluating a law


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
            def fn(theta_IQ, x):
                return jax.vmap(lambda t: law.log_predict(dict(zip(law.params, t, strict=True)),
                                                          x))(theta_IQ)
        else:
            fn = law.log_predict if what == "log_predict" else law.to_public
        hit = (law, jax.jit(fn))
        _JITTED[(id(law), what)] = hit
    return hit[1]


def _log_predict_rows(law: Law, theta_IQ: np.ndarray, inputs: Mapping[str, np.ndarray]
                      ) -> np.ndarray:
    """``law.log_predict`` of every row of ``theta_IQ`` at the points ``inputs``: ``(I, M)``, float64."""
    with jax.enable_x64(True):
        x = {k: jnp.asarray(v, jnp.float64) for k, v in inputs.items()}
        return np.asarray(_jitted(law, "rows")(jnp.asarray(theta_IQ, jnp.float64), x))


def _public(law: Law, theta: Mapping[str, Any]) -> dict[str, Any]:
    """``law.to_public`` in float64 (scalars → floats, arrays → numpy arrays)."""
    with jax.enable_x64(True):
        out = _jitted(law, "public")({k: jnp.asarray(v, jnp.float64) for k, v in theta.items()})
        out = {k: np.asarray(v, np.float64) for k, v in out.items()}
    return {k: float(v) if v.ndim == 0 else v for k, v in out.items()}
