"""G_random (:mod:`jscale.growth`): the new parameters freshly initialised and blended in — MSG
style (Yao et al. 2024, "Masked Structural Growth for 2x Faster Language Model Pre-training") —
with a factor ``m`` that rises from 0 to 1 over the grown run's first ``growth.grow_steps`` steps.

:func:`random` grows the small tree: the small model's entries move to their big positions as
``zero`` moves them (:func:`jscale.growth.plans.zero_plan`; depth: new layers interleaved, each
after the layer it follows), every new entry is ``cfg_big``'s own init drawn with ``key``
(``models.init``: new layers whole, new units' weights, new features' columns). The stored
parameters are that tree; the model computes with :func:`blend` of it (``jscale.core.
effective_params``), whose factors (:func:`blend_factors`) are:

* **depth**: a new layer's residual output projections (attention ``w_o``, SwiGLU ``w_down``,
  the experts' ``w_down``, Mamba's ``w_out`` / ``b_out``) × ``m`` — the block is linear in them,
  so a new layer outputs exactly ``x + m·block(x)`` (MSG's layer mask);
* **width**: every new entry of a randomly initialised leaf × ``m`` (the constant-initialised
  leaves — norm scales, Mamba's ``A_log`` and ``D``, biases — take their init as ``zero`` does),
  and every RMSNorm scale over a grown ``D`` × ``sqrt(r) + m·(1 − sqrt(r))``, ``r = D_small /
  D_big`` (``zero``'s correction at ``m = 0``, none at ``m = 1``). A new unit's contribution is
  scaled by ``m`` once per masked weight on its path (``m²`` for an FFN unit, whose weights in
  and out are both new) where MSG masks its activation once (``m``): the same end points, a
  steeper start.

At ``m = 0`` the blend is exactly ``zero``'s model — function-preserving where ``zero`` is (depth,
d_ff, heads, experts' width exactly; ``d_model`` up to the RMSNorm epsilon becoming
``eps·D_big/D_small``) — and from ``m = 1`` on it is the stored tree itself, bitwise, so a run whose
``grow_steps`` are over trains and saves an ordinary model. ``m`` is computed from the traced step:
one compiled program for the whole blend.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jscale import models
from jscale.growth.checks import check_params
from jscale.growth.index import Array, Params, Path, abstract, const_fills, key_path, model_spec
from jscale.growth.plans import LeafPlan, zero_plan


def random(params_small: Params, cfg_small: Any, cfg_big: Any, key: Array | None = None) -> Params:
    """G_random's stored tree: the small entries at ``zero``'s positions, every new entry drawn
    by ``cfg_big``'s init with ``key`` (required). Not function-preserving by itself: the model
    computes with :func:`blend` of it, exact at ``m = 0`` where ``zero`` is."""
    if key is None:
        raise ValueError("grow('random'): the new parameters are drawn at random: pass key=")
    return _random(params_small, key, cfg_small=cfg_small, cfg_big=cfg_big)


@functools.partial(jax.jit, static_argnames=("cfg_small", "cfg_big"))
def _random(params_small: Params, key: Array, *, cfg_small: Any, cfg_big: Any) -> Params:
    check_params(params_small, cfg_small)
    plans = zero_plan(cfg_small, cfg_big)
    fresh = models.init(key, cfg_big)

    def leaf(path, x, init):
        plan = plans.get(key_path(path))
        if plan is None:
            return x.astype(init.dtype)
        for axis, index in plan.gathers:
            x = jnp.take(x, index, axis=axis)
        return (x if plan.new is None else jnp.where(plan.new, init, x)).astype(init.dtype)
    return jax.tree_util.tree_map_with_path(leaf, params_small, fresh)


@functools.lru_cache(maxsize=32)
def blend_factors(cfg_small: Any,
                  cfg_big: Any) -> dict[Path, tuple[np.ndarray | None, float | None]]:
    """``{path: (masked, norm_factor)}`` of ``random`` growth from model ``cfg_small`` to
    ``cfg_big``: ``masked`` the entries scaled by ``m`` (a boolean array that broadcasts against
    the leaf, or ``None``), ``norm_factor`` the ``sqrt(r)`` of an RMSNorm scale over a grown ``D``
    (or ``None``). Host constants, computed once per pair of configs."""
    with jax.ensure_compile_time_eval():
        plans: dict[Path, LeafPlan] = zero_plan(cfg_small, cfg_big)
        fills = const_fills(model_spec(cfg_big))
        depth = model_spec(cfg_big).n_layers != model_spec(cfg_small).n_layers
        out = {}
        for path, _ in _leaves(cfg_big):
            plan = plans.get(path)
            if plan is None:
                continue
            if depth:  # zero's reset: the new layers' residual outputs
                masked = None if plan.reset is None else np.asarray(plan.reset)
            else:
                masked = None if (plan.new is None or path in fills) else np.asarray(plan.new)
            factor = None if plan.factor is None else float(plan.factor)
            if masked is not None or factor is not None:
                out[path] = (masked, factor)
        return out


def _leaves(cfg: Any) -> list[tuple[Path, Any]]:
    return [(key_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(abstract(cfg))[0]]


def blend(params: Params, factors: dict[Path, tuple[np.ndarray | None, float | None]],
          m: Array) -> Params:
    """``params`` as the model computes with them at blend factor ``m`` (a traced scalar in
    [0, 1]): the ``masked`` entries × ``m``, the norm scales × ``sqrt(r) + m·(1 − sqrt(r))``;
    ``params`` itself, bitwise, once ``m >= 1``."""
    m = jnp.asarray(m, jnp.float32)

    def leaf(path, x):
        found = factors.get(key_path(path))
        if found is None:
            return x
        masked, factor = found
        y = x.astype(jnp.float32)
        if masked is not None:
            y = y * jnp.where(masked, m, jnp.float32(1))
        if factor is not None:
            y = y * (factor + m * (1 - factor))
        return jnp.where(m >= 1, x, y.astype(x.dtype))
    return jax.tree_util.tree_map_with_path(leaf, params)
