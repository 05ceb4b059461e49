"""The growth operators (:mod:`jscale.growth`): :data:`OPERATORS`, the table of every operator of
Du et al. 2024 — implemented or not — and the public functions :func:`grow`, one function per
implemented operator, :func:`grow_optimizer_state` and :func:`growth_tokens`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jscale.config import check
from jscale.growth.checks import FAMILIES, check_params
from jscale.growth.index import Array, Params, Path
from jscale.growth.ligo import learn
from jscale.growth.masked import random as _random_tree
from jscale.growth.plans import (
    direct_width_plan,
    grow_moments,
    grow_params,
    interpolate_plan,
    stack_plan,
    zero_plan,
)


@dataclasses.dataclass(frozen=True)
class Operator:
    """One growth operator of :data:`OPERATORS`.

    Attributes:
      name: the ``op`` that selects it.
      grows: ``"depth"``, ``"width"`` or ``"depth or width"`` (one per call, by the configs).
      preserves_function: whether the grown model computes the small model's function (see
        ``note`` for the exact claim).
      families: the model families (registry names) it supports; ``"transformer"`` includes MoE.
      supported: whether it is implemented; ``fn`` is ``None`` when not.
      fn: ``(params_small, cfg_small, cfg_big, key, **options) -> params_big``.
      plan: ``(cfg_small, cfg_big, key, **options) -> {path: leaf plan}``, the index maps ``fn``
        applies (:func:`grow_optimizer_state` applies them to the moments).
      note: what it does and what it preserves, in a sentence.
    """

    name: str
    grows: str
    preserves_function: bool
    families: tuple[str, ...]
    supported: bool
    fn: Callable[..., Params] | None
    plan: Callable[..., dict[Path, Any]] | None
    note: str


def grow(params_small: Params, cfg_small: Any, cfg_big: Any, op: str, *, key: Array | None = None,
         **options: Any) -> Params:
    """``params_small`` (a model of ``cfg_small``) grown by operator ``op`` into the parameters of a
    ``cfg_big`` model (see :mod:`jscale.growth` and :data:`OPERATORS`). ``key`` feeds the random
    choices of ``direct_width``; ``options`` go to the operator (``zero``: ``placement``). Raises
    :class:`~jscale.config.ConfigError` naming the field when ``cfg_big`` is not a shape ``op`` can
    make from ``cfg_small`` or the family is not supported, ``NotImplementedError`` for an operator
    of the table that is not built yet."""
    return operator(op).fn(params_small, cfg_small, cfg_big, key, **options)


def operator(op: str) -> Operator:
    """The implemented operator ``op`` of :data:`OPERATORS` (``ConfigError`` for an unknown name,
    ``NotImplementedError`` for one not built yet)."""
    check(op in OPERATORS, "op", f"must be a growth operator, one of {tuple(OPERATORS)}", op)
    found = OPERATORS[op]
    if not found.supported:
        raise NotImplementedError(f"growth operator {op!r} is not built yet: {found.note}")
    return found


def stack(params_small: Params, cfg_small: Any, cfg_big: Any, key: Array | None = None) -> Params:
    """G_stack: every stack repeated whole ``g`` times (``0..L−1, 0..L−1, …``); ``key`` unused."""
    return grow_params(params_small, key, cfg_small=cfg_small, cfg_big=cfg_big, plan=stack_plan,
                       options=())


def interpolate(params_small: Params, cfg_small: Any, cfg_big: Any,
                key: Array | None = None) -> Params:
    """Each layer repeated ``g`` times in place (``0, 0, 1, 1, …``); ``key`` unused."""
    return grow_params(params_small, key, cfg_small=cfg_small, cfg_big=cfg_big,
                       plan=interpolate_plan, options=())


def zero(params_small: Params, cfg_small: Any, cfg_big: Any, key: Array | None = None, *,
         placement: str = "interleave") -> Params:
    """G_zero: new layers that are identity blocks (depth, when ``n_layers`` grows; ``placement``
    ``"interleave"`` or ``"end"``) or new units with zero weights (width); see
    :mod:`jscale.growth` for what is preserved exactly. ``key`` unused."""
    return grow_params(params_small, key, cfg_small=cfg_small, cfg_big=cfg_big, plan=zero_plan,
                       options=(("placement", placement),))


def direct_width(params_small: Params, cfg_small: Any, cfg_big: Any,
                 key: Array | None = None) -> Params:
    """Net2Net/bert2BERT width growth: new units copy old ones (chosen with ``key``), their readers
    divided among the copies; ``d_model`` by an integer factor. Function-preserving."""
    return grow_params(params_small, key, cfg_small=cfg_small, cfg_big=cfg_big,
                       plan=direct_width_plan, options=())


def random(params_small: Params, cfg_small: Any, cfg_big: Any, key: Array | None = None) -> Params:
    """G_random: new parameters drawn by ``cfg_big``'s init with ``key`` (depth: new layers
    interleaved), blended in during training with a factor rising 0 → 1
    (:mod:`jscale.growth.masked`: exact at 0 where ``zero`` is). The tree returned is the stored
    parameters, not function-preserving by itself."""
    return _random_tree(params_small, cfg_small, cfg_big, key)


def grow_optimizer_state(opt_state_small: Any, params_small: Params, cfg_small: Any, cfg_big: Any,
                         op: str, *, key: Array | None = None, **options: Any) -> Any:
    """``opt_state_small`` (an optax state for ``params_small``) with every subtree that mirrors the
    parameters (same tree structure and shapes: Adam's ``mu``, ``nu``) grown by ``op``'s maps —
    copies for ``stack``/``interpolate``, old entries moved and new ones zero for ``zero`` and
    ``direct_width`` — and everything else (counts, hyperparameters) kept. Pass the ``key`` and
    ``options`` given to :func:`grow`, so the moments follow the same choices."""
    found = operator(op)
    check(found.plan is not None, "op", "has no fixed index maps to move the optimizer moments "
          "with (G_learn's are learned): start a fresh optimizer state", op)
    check_params(params_small, cfg_small)
    return grow_moments(opt_state_small, key, treedef=jax.tree.structure(params_small),
                        shapes=tuple(tuple(jnp.shape(x)) for x in jax.tree.leaves(params_small)),
                        cfg_small=cfg_small, cfg_big=cfg_big, plan=found.plan,
                        options=tuple(sorted(options.items())))


def growth_tokens(n_params: float, tokens: float) -> float:
    """The paper's guideline for when to grow (Du et al. 2024, Eq. 2): the tokens ``d`` to train the
    small model before G_stack, for a target model of ``n_params`` parameters trained on ``tokens``
    tokens: ``log10 d = 0.88·log10 N + 163.27 / log10 C − 5.74`` with ``C = 6·N·D``. (Llama2-7B,
    N 7e9, D 2e12 → 11.11e9; Llama3-8B, N 8e9, D 15e12 → 6.58e9.)"""
    if not (n_params > 0 and tokens > 0 and 6 * n_params * tokens > 1):
        raise ValueError(f"growth_tokens: needs n_params > 0, tokens > 0 and 6·N·D > 1 "
                         f"(got n_params={n_params!r}, tokens={tokens!r})")
    log_c = math.log10(6 * n_params * tokens)
    return 10 ** (0.88 * math.log10(n_params) + 163.27 / log_c - 5.74)


# ---------------------------------------------------------------------------------------------------
# the table


#: Every operator of Du et al. 2024 (G_direct as ``stack``/``interpolate``/``direct_width``,
#: G_zero, G_random, G_learn), implemented or not (``supported``).
OPERATORS: dict[str, Operator] = {op.name: op for op in (
    Operator("stack", "depth", False, FAMILIES["stack"], True, stack, stack_plan,
             "G_stack: each stack repeated whole g times (0..L-1, 0..L-1, ...); embedding, final "
             "norm and head copied"),
    Operator("interpolate", "depth", False, FAMILIES["interpolate"], True, interpolate, interpolate_plan,
             "each layer (an MoE period) repeated g times in place (0, 0, 1, 1, ...)"),
    Operator("zero", "depth or width", True, FAMILIES["zero"], True, zero, zero_plan,
             "G_zero: identity new layers (zero residual outputs), exact; or zero new units, exact "
             "for d_ff/heads/experts' width, and for d_model up to the RMSNorm epsilon becoming "
             "eps·D_big/D_small"),
    Operator("direct_width", "width", True, FAMILIES["direct_width"], True, direct_width,
             direct_width_plan,
             "Net2Net/bert2BERT: new units copy random old ones, readers divided among the copies; "
             "d_model by an integer factor; exact"),
    Operator("random", "depth or width", False, FAMILIES["random"], True, random, zero_plan,
             "G_random (MSG-style): new parameters freshly initialised and blended in with a "
             "factor m rising 0 -> 1 over growth.grow_steps (new layers x + m*block(x)); exact at "
             "m = 0 where zero is"),
    Operator("learn", "depth or width", False, FAMILIES["learn"], True, learn, None,
             "G_learn (LiGO): linear depth/width expansion matrices, started as stack/interpolate "
             "(depth) or direct_width (width), trained on the big model's loss (only the "
             "matrices), then materialised; function-preserving only at step 0 of width growth"),
)}
