"""G_learn (LiGO; Wang et al. 2023, "Learning to Grow Pretrained Models for Efficient Transformer
Training", arXiv 2303.00980): the big model's parameters as *learned linear expansions* of the
small ones, trained for a few steps on the big model's loss, then materialised into an ordinary
parameter tree (:func:`learn`).

**What is learned.** One call grows the depth or the width, decided by the configs as for the other
operators (:mod:`jscale.growth`; the same refusals, :mod:`jscale.growth.checks`, under the name
``'learn'``). Only the expansion matrices are trained; the small parameters stay fixed.

* Depth (``n_layers`` × g): every leaf stacked on ``L`` gets its own matrix ``W [L_big, L_small]``
  (``L`` counts a stack's scan steps: an MoE period moves as one), big layer
  ``l = Σ_j W[l, j] · small layer j``. Not tied across the leaves of a stack: LiGO's depth
  expansion has separate coefficients per module (attention projections, FFN, norms, ...), and the
  matrices are tiny. The embedding, the final norm and the head are copied.
* Width: one matrix ``M [n_big, n_small]`` per grown width kind (:func:`jscale.growth.index.
  axis_kind`: ``D``, kv groups ``G``, query heads ``H``, ``ffn``, ``expert``, ``shared``,
  ``inner``, ``rank``) and role, **tied across all layers and stacks** as LiGO ties its width
  operator. ``D``, the residual stream, has one matrix for every axis that reads or writes it
  (LiGO ties the residual expansion throughout, since every sub-layer adds into the same stream).
  The other kinds have a writer matrix ``KIND.out`` (the axes that produce or carry a unit) and a
  reader matrix ``KIND.in`` (the axes over which a leaf reads the unit back:
  :data:`jscale.growth.index.READS`, e.g. ``w_down``'s ``F``, ``w_o``'s ``H``). A grown leaf is
  the small leaf contracted on each grown axis with that axis's matrix (the axes named by the
  leaf's shape letters), times a fixed factor for the RMSNorm scales over ``D`` (``D_s/D_b``, as
  ``direct_width``). Leaves that do not grow are copied.

**Initialisation.** The matrices start as the one-hot (gather) matrices of an existing operator,
so the tree materialised at step 0 is that operator's result: ``init="stack"`` (default) or
``"interpolate"`` for depth — not function-preserving — and ``"direct_width"`` (the only width
init; its random choices drawn with ``key``, the same as ``grow(..., "direct_width", key=key)``)
for width, whose reader matrices start as one-hot / copies — so width LiGO starts
function-preserving. Training the matrices then changes the function (that is the point: they
follow the big model's loss).

**Training.** ``steps`` Adam steps (``optax.adam(lr)``) on the matrices, minimising
:func:`jscale.models.loss_and_state` of the materialised big model on one batch per step, with the big
model's initial model state (the MoE router bias at its init; it is not updated). One compiled
step serves every step (and every call with the same configs, ``lr`` and batch shapes).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jscale import models, nn
from jscale.config import check
from jscale.growth.checks import check_depth, check_pair, check_params, check_width
from jscale.growth.index import (
    READS,
    Array,
    Params,
    Path,
    abstract,
    axis_kind,
    key_path,
    layout,
    model_spec,
    named_leaves,
    width_maps,
)
from jscale.growth.plans import direct_width_plan, interpolate_plan, stack_plan

#: The initialisations of depth LiGO (the operator whose maps the matrices start as).
DEPTH_INITS = {"stack": stack_plan, "interpolate": interpolate_plan}
#: The initialisations of width LiGO.
WIDTH_INITS = ("direct_width",)


@dataclasses.dataclass(frozen=True)
class GrownLeaf:
    """How one leaf of the big tree is made: the small leaf at ``path`` contracted on each
    ``(axis, matrix name)`` of ``axes`` with that expansion matrix ``[n_big, n_small]``, then
    multiplied by ``factor`` (``None``: 1)."""

    path: Path
    axes: tuple[tuple[int, str], ...]
    factor: float | None = None


@dataclasses.dataclass(frozen=True)
class Expansion:
    """The structure of a LiGO operator (hashable: a static argument of the compiled step): what it
    grows (``"depth"`` or ``"width"``), the operator it starts as (``init``) and every grown leaf;
    the leaves not listed are copied. The matrices themselves are a separate pytree
    ``{name: float32[n_big, n_small]}`` (:func:`init_expansion`)."""

    grows: str
    init: str
    leaves: tuple[GrownLeaf, ...]


def init_expansion(cfg_small: Any, cfg_big: Any, key: Array | None = None,
                   init: str | None = None) -> tuple[Expansion, dict[str, Array]]:
    """``(structure, matrices)`` of the LiGO operator from ``cfg_small`` to ``cfg_big``, the
    matrices at their init (see :mod:`jscale.growth.ligo`): the maps of ``init`` — ``"stack"``
    (the depth default) or ``"interpolate"`` for depth, ``"direct_width"`` (the width default,
    drawn with ``key``) for width — as one-hot matrices. Raises
    :class:`~jscale.config.ConfigError` naming the field for a pair of configs no call can map, a
    family not supported, or an ``init`` that does not fit what grows."""
    check_pair(cfg_small, cfg_big, "learn")
    small = dict(named_leaves(abstract(cfg_small)))
    if model_spec(cfg_big).n_layers != model_spec(cfg_small).n_layers:
        init = "stack" if init is None else init
        check(init in DEPTH_INITS, "init", f"depth growth (model.n_layers) starts learn as one of "
              f"{tuple(DEPTH_INITS)}", init)
        check_depth(cfg_small, cfg_big, "learn")
        leaves, theta = [], {}
        for path, plan in sorted(DEPTH_INITS[init](cfg_small, cfg_big).items()):
            ((axis, index),) = plan.gathers
            name = "depth:" + ".".join(path)
            theta[name] = jax.nn.one_hot(index, small[path].shape[axis], dtype=jnp.float32)
            leaves.append(GrownLeaf(path, ((axis, name),)))
        return Expansion("depth", init, tuple(leaves)), theta

    init = "direct_width" if init is None else init
    check(init in WIDTH_INITS, "init", f"width growth starts learn as one of {WIDTH_INITS}", init)
    ws, wb = check_width(cfg_small, cfg_big, "learn")
    check(wb["D"] % ws["D"] == 0, "model.d_model", f"'learn' starts width growth as "
          f"'direct_width', which grows d_model only by an integer factor of the small model's "
          f"{ws['D']}", wb["D"])
    plans = direct_width_plan(cfg_small, cfg_big, key)
    maps = width_maps(ws, wb, key, copy=True)  # the maps direct_width_plan gathers with
    parts, _ = layout(model_spec(cfg_small))
    leaves, theta = [], {}
    for path, plan in sorted(plans.items()):
        part = parts.get(path[:2])
        inner = (*path[2:-1], nn.unstack_name(path[-1]))
        letters = path[-1].rsplit("_", 1)[-1]
        axes, reads = [], False
        for axis, _ in plan.gathers:
            letter = letters[axis]
            kind = axis_kind(letter, part, inner)
            m = maps[kind]
            onehot = jax.nn.one_hot(m.index, small[path].shape[axis], dtype=jnp.float32)
            if kind == "D":
                name, matrix = "D", onehot
            elif letter in READS.get(inner[-1], ""):
                name, matrix, reads = f"{kind}.in", onehot / m.copies[:, None], True
            else:
                name, matrix = f"{kind}.out", onehot
            theta.setdefault(name, matrix)
            axes.append((axis, name))
        # a reader's Net2Net division lives in its ".in" matrix; what remains is the RMSNorm
        # scales' fixed D_s/D_b (a python float: key-independent)
        factor = None if reads or plan.factor is None else float(plan.factor)
        leaves.append(GrownLeaf(path, tuple(axes), factor))
    return Expansion("width", init, tuple(leaves)), theta


def materialise(theta: dict[str, Array], params_small: Params, *, expansion: Expansion,
                cfg_big: Any) -> Params:
    """The big model's parameters: every grown leaf of ``expansion`` the small leaf contracted
    with its matrices of ``theta`` (float32, highest precision), the others copied; structure,
    shapes and dtypes of ``models.init(key, cfg_big)``. Pure and differentiable in ``theta``."""
    grown = {leaf.path: leaf for leaf in expansion.leaves}

    def leaf_of(path, x, want):
        leaf = grown.get(key_path(path))
        if leaf is None:
            return jnp.asarray(x).astype(want.dtype)
        y = jnp.asarray(x).astype(jnp.float32)
        for axis, name in leaf.axes:
            y = jnp.tensordot(theta[name], y, axes=((1,), (axis,)),
                              precision=jax.lax.Precision.HIGHEST)
            y = jnp.moveaxis(y, 0, axis)
        if leaf.factor is not None:
            y = y * leaf.factor
        return y.astype(want.dtype)
    return jax.tree_util.tree_map_with_path(leaf_of, params_small, abstract(cfg_big))


@functools.partial(jax.jit, static_argnames=("cfg_big", "expansion", "lr"))
def train_step(theta: dict[str, Array], opt_state: Any, params_small: Params, model_state: Any,
               batch: dict[str, Array], *, cfg_big: Any, expansion: Expansion,
               lr: float) -> tuple[dict[str, Array], Any, Array]:
    """One Adam step on the expansion matrices: ``(theta, opt_state, loss before the step)``, the
    loss :func:`jscale.models.loss_and_state` of the materialised big model on ``batch``. Compiled once per
    ``(cfg_big, expansion, lr)`` and batch shapes."""
    def loss(th):
        params = materialise(th, params_small, expansion=expansion, cfg_big=cfg_big)
        return models.loss_and_state(params, batch, cfg_big, model_state)[0]
    value, grads = jax.value_and_grad(loss)(theta)
    updates, opt_state = optax.adam(lr).update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, value


_materialise = jax.jit(materialise, static_argnames=("expansion", "cfg_big"))


def learn(params_small: Params, cfg_small: Any, cfg_big: Any, key: Array | None = None, *,
          batches: Iterable[dict[str, Array]], steps: int, lr: float = 1e-3,
          init: str | None = None) -> Params:
    """G_learn (LiGO): ``params_small`` (a ``cfg_small`` model) grown into a ``cfg_big`` model by
    linear expansion matrices started as operator ``init`` (``"stack"`` or ``"interpolate"`` for
    depth, default ``"stack"``; ``"direct_width"`` for width, its random choices drawn with
    ``key``), trained for ``steps`` Adam steps (``lr``) on the big model's loss over the first
    ``steps`` batches of ``batches`` (dicts ``{"inputs": int32[B, T], "targets": int32[B, T]}``,
    optionally ``"segment_ids"``; keep their shapes fixed, or the step recompiles), then
    materialised: a tree with the structure, shapes and dtypes of ``models.init(key, cfg_big)``.
    ``steps=0`` returns ``init``'s result. See :mod:`jscale.growth.ligo` for what is learned and
    tied. Raises :class:`~jscale.config.ConfigError` naming the field for configs no call maps,
    ``ValueError`` for parameters that are not ``cfg_small``'s or when ``batches`` runs out."""
    check(isinstance(steps, int) and steps >= 0, "steps", "must be an integer >= 0", steps)
    check(lr > 0, "lr", "must be > 0", lr)
    check_params(params_small, cfg_small)
    expansion, theta = init_expansion(cfg_small, cfg_big, key, init)
    model_state = models.init_model_state(cfg_big)
    opt_state = optax.adam(lr).init(theta)
    it = iter(batches)
    for i in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(f"learn: batches ran out after {i} batches; steps={steps} needs "
                             f"{steps} (one per step)") from None
        theta, opt_state, _ = train_step(theta, opt_state, params_small, model_state, batch,
                                         cfg_big=cfg_big, expansion=expansion, lr=float(lr))
    return _materialise(theta, params_small, expansion=expansion, cfg_big=cfg_big)
