"""How each leaf grows (:mod:`jscale.growth`): an operator's *plan* is ``{path: LeafPlan}``, the
gathers, resets and factors that map a small leaf onto the big one; :func:`grow_params` applies a
plan to the parameters and :func:`grow_moments` to an optax state's moments, each as one compiled
program whose checks run as it traces."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jscale import nn
from jscale.config import check
from jscale.growth.checks import check_depth, check_pair, check_params, check_width
from jscale.growth.index import (
    READS,
    RESIDUAL_OUT,
    Array,
    Params,
    Path,
    abstract,
    axis_kind,
    const_fills,
    key_path,
    layout,
    model_spec,
    named_leaves,
    width_maps,
)

#: Where the new layers of zero depth growth go (see :mod:`jscale.growth`).
PLACEMENTS = ("interleave", "end")


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """One leaf's growth: ``take`` each ``(axis, index)`` (big position ← small position); then for
    the parameters set the ``reset`` entries to ``fill`` and multiply by ``factor``, for the moments
    zero the ``new`` entries (masks and factor broadcast against the grown leaf)."""

    gathers: tuple[tuple[int, Array], ...]
    new: Array | None = None
    reset: Array | None = None
    fill: Any = 0.0
    factor: Array | float | None = None


def _apply(tree: Params, plans: dict[Path, LeafPlan], *, moments: bool) -> Params:
    """``tree`` with every leaf of ``plans`` grown (``moments``: new entries zeroed instead of
    reset and rescaled)."""
    def leaf(path, x):
        plan = plans.get(key_path(path))
        if plan is None:
            return x
        y = x
        for axis, index in plan.gathers:
            y = jnp.take(y, index, axis=axis)
        if moments:
            return y if plan.new is None else jnp.where(plan.new, jnp.zeros((), y.dtype), y)
        if plan.reset is not None:
            y = jnp.where(plan.reset, jnp.asarray(plan.fill, y.dtype), y)
        if plan.factor is not None:
            y = (y.astype(jnp.float32) * plan.factor).astype(y.dtype)
        return y
    return jax.tree_util.tree_map_with_path(leaf, tree)


@functools.partial(jax.jit, static_argnames=("cfg_small", "cfg_big", "plan", "options"))
def grow_params(params_small: Params, key: Array | None, *, cfg_small: Any, cfg_big: Any,
                plan: Callable[..., dict[Path, LeafPlan]], options: tuple) -> Params:
    """The parameters grown by ``plan`` (one compiled program; the checks run as it traces)."""
    check_params(params_small, cfg_small)
    out = _apply(params_small, plan(cfg_small, cfg_big, key, **dict(options)), moments=False)
    want = abstract(cfg_big)
    if jax.tree.structure(out) != jax.tree.structure(want) or any(
            x.shape != w.shape for x, w in zip(jax.tree.leaves(out), jax.tree.leaves(want),
                                               strict=True)):
        raise AssertionError("growth made a tree unlike cfg_big's init (a bug in jscale.growth)")
    return jax.tree.map(lambda x, w: x.astype(w.dtype), out, want)


@functools.partial(jax.jit, static_argnames=("treedef", "shapes", "cfg_small", "cfg_big", "plan",
                                             "options"))
def grow_moments(opt_state: Any, key: Array | None, *, treedef: Any, shapes: tuple,
                 cfg_small: Any, cfg_big: Any, plan: Callable[..., dict[Path, LeafPlan]],
                 options: tuple) -> Any:
    """``opt_state`` with its subtrees of the parameters' structure and ``shapes`` grown."""
    plans = plan(cfg_small, cfg_big, key, **dict(options))
    visited = []

    def mirrors(node: Any) -> bool:
        leaves, td = jax.tree.flatten(node)
        return td == treedef and tuple(tuple(jnp.shape(x)) for x in leaves) == shapes

    def visit(node: Any) -> Any:
        if not mirrors(node):
            return node
        visited.append(node)
        return _apply(node, plans, moments=True)

    out = jax.tree.map(visit, opt_state, is_leaf=mirrors)
    if not visited:
        raise ValueError("opt_state_small: no subtree has the parameters' tree structure and shapes "
                         "(Adam's mu/nu); nothing to grow")
    return out


def stack_plan(cfg_small: Any, cfg_big: Any, key: Array | None = None) -> dict[Path, LeafPlan]:
    """``stack``'s plan: every stack's layers ``0..L-1`` repeated whole."""
    return depth_plan(cfg_small, cfg_big, "stack", in_place=False)


def interpolate_plan(cfg_small: Any, cfg_big: Any,
                     key: Array | None = None) -> dict[Path, LeafPlan]:
    """``interpolate``'s plan: each layer repeated in place."""
    return depth_plan(cfg_small, cfg_big, "interpolate", in_place=True)


def zero_plan(cfg_small: Any, cfg_big: Any, key: Array | None = None, *,
              placement: str = "interleave") -> dict[Path, LeafPlan]:
    """``zero``'s plan: identity new layers (depth, when ``n_layers`` grows) or zero new units."""
    check(placement in PLACEMENTS, "placement", f"must be one of {PLACEMENTS}", placement)
    check_pair(cfg_small, cfg_big, "zero")
    if model_spec(cfg_big).n_layers != model_spec(cfg_small).n_layers:
        return depth_plan(cfg_small, cfg_big, "zero", in_place=placement == "interleave")
    return width_plan(cfg_small, cfg_big, "zero", key)


def direct_width_plan(cfg_small: Any, cfg_big: Any,
                      key: Array | None = None) -> dict[Path, LeafPlan]:
    """``direct_width``'s plan: new units copy old ones, their readers divided among the copies."""
    return width_plan(cfg_small, cfg_big, "direct_width", key)


def depth_plan(cfg_small: Any, cfg_big: Any, op: str, *, in_place: bool) -> dict[Path, LeafPlan]:
    """Every stack's leaves gathered on ``L`` (``g·L`` positions); for ``zero`` the new layers'
    residual outputs reset to 0 and their moments zeroed."""
    g = check_depth(cfg_small, cfg_big, op)
    spec = model_spec(cfg_small)
    parts, _ = layout(spec)
    steps = {st.key: st.n_steps for st in spec.layer_stacks}
    plans = {}
    for path, x in named_leaves(abstract(cfg_small)):
        if path[0] not in steps:
            continue
        i = jnp.arange(g * steps[path[0]])
        index = i // g if in_place else i % steps[path[0]]
        new = reset = None
        if op == "zero":
            new = ((i % g != 0) if in_place else (i >= steps[path[0]])).reshape(
                (-1,) + (1,) * (x.ndim - 1))
            part = parts.get(path[:2])
            if part is not None:  # (a norm scale is not a residual output)
                if type(part) not in RESIDUAL_OUT:
                    raise ValueError(f"zero depth growth: which leaves of {type(part).__name__} "
                                     f"write the residual stream is not known ({path[1]!r})")
                if (*path[2:-1], nn.unstack_name(path[-1])) in RESIDUAL_OUT[type(part)]:
                    reset = new
        plans[path] = LeafPlan(((0, index),), new=new, reset=reset)
    return plans


def width_plan(cfg_small: Any, cfg_big: Any, op: str,
               key: Array | None) -> dict[Path, LeafPlan]:
    """Every leaf gathered along its grown axes (see :mod:`jscale.growth`, **Width**)."""
    ws, wb = check_width(cfg_small, cfg_big, op)
    copy = op == "direct_width"
    maps = width_maps(ws, wb, key if copy else None, copy)
    spec_s = model_spec(cfg_small)
    parts, norms = layout(spec_s)
    fills = {} if copy else const_fills(model_spec(cfg_big))
    r = ws["D"] / wb["D"]
    norm_factor = r if copy else math.sqrt(r)
    plans = {}
    for path, x in named_leaves(abstract(cfg_small)):
        part = parts.get(path[:2])
        inner = (*path[2:-1], nn.unstack_name(path[-1]))
        letters = path[-1].rsplit("_", 1)[-1]
        if not (letters.isupper() and len(letters) == x.ndim):
            raise ValueError(f"growth reads a leaf's axes from its name's shape letters: "
                             f"{'.'.join(path)} has shape {x.shape}")
        gathers, new, factor = [], None, None
        for axis, letter in enumerate(letters):
            axis_map = maps.get(axis_kind(letter, part, inner))
            if axis_map is None:
                continue
            shape = [1] * x.ndim
            shape[axis] = -1
            gathers.append((axis, axis_map.index))
            mask = axis_map.new.reshape(shape)
            new = mask if new is None else new | mask
            if copy and letter in READS.get(inner[-1], ""):
                div = (1.0 / axis_map.copies).reshape(shape)
                factor = div if factor is None else factor * div
        if "D" in maps and (path == ("final_norm", "scale_D") or path[:2] in norms):
            factor = norm_factor  # an RMSNorm scale over D (its only grown axis)
        if gathers or factor is not None:
            plans[path] = LeafPlan(tuple(gathers), new=new, reset=None if copy else new,
                                   fill=fills.get(path, 0.0), factor=factor)
    return plans

