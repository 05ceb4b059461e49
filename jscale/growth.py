"""Growth operators: a trained small model's parameters → the initialization of a larger model
(Du et al. 2024, "Stacking Your Transformers: A Closer Look at Model Growth for Efficient LLM
Pre-Training", arXiv 2405.15319; reference code tongxuluo/prts).

:func:`grow` ``(params_small, cfg_small, cfg_big, op, *, key=None, **options) -> params_big`` runs
the operator ``op`` of :data:`OPERATORS` — the table of what each operator grows, whether it
preserves the function, which families it supports and whether it is implemented. Each operator is
a pure function ``(params_small, cfg_small, cfg_big, key) -> params_big`` over the scaffold's tree
(:mod:`jscale.models.lm`); its result has exactly the structure, shapes and dtypes of
``models.init(key, cfg_big)``. One call grows the depth or the width, not both (two calls through
an intermediate config do both). :func:`grow_optimizer_state` grows an optax state's moments with
the same maps; :func:`growth_tokens` is the paper's guideline for when to grow.

**Depth** (``cfg_big`` is ``cfg_small`` with ``n_layers`` × g, g an integer ≥ 2). Every stack's
leading ``L`` axis becomes ``g·L``; the embedding, the final norm and the head are copied.

* ``stack`` (G_stack): the stack repeated whole, layers ``0..L−1, 0..L−1, …`` (prts'
  ``stacking_list``). Not function-preserving.
* ``interpolate``: each layer repeated ``g`` times in place, ``0, 0, 1, 1, …``. Not
  function-preserving.
* ``zero`` with more layers: new layers whose residual output projections are zero — attention
  ``w_o``, SwiGLU ``w_down``, the MoE routed and shared experts' ``w_down``, Mamba's ``w_out`` and
  ``b_out`` — so each new block is the identity and the function is preserved exactly. Placement
  (option ``placement``): ``"interleave"`` (default) puts each original layer's ``g − 1`` new layers
  right after it (``interpolate``'s order), ``"end"`` puts them after the original stack
  (``stack``'s order). A new layer's other parameters copy the original layer it repeats (its
  neighbour, for ``"interleave"``): no key needed, and its input projections fit the statistics of
  the stream they read.

A model of several stacks (the MoE transformer: ``layers`` / ``moe_layers`` / ``tail_layers``,
:mod:`jscale.models.transformer`) grows each stack ``g``-fold on its own, in the stack's steps: an
MoE period of ``every`` layers moves as one (``interpolate`` repeats periods, not layers). That is
what ``cfg_big`` describes exactly when ``moe.first_dense_layers`` is scaled by ``g`` too and the
dense tail after the last period, ``g``-fold, is still shorter than ``every``; other configs are
refused. With no leading dense layers and no tail, per-stack ``stack`` is G_stack of the whole
model, layer for layer. The MoE router bias is model state, not a parameter: it is not grown here
(keep it, stacked on each stack's ``L`` like the parameters, or start it at zero).

**Width** (``d_model``, ``d_ff``, ``n_heads``, ``n_kv_heads``, ``moe.d_expert``; Mamba's
``d_model``, ``expand``, ``dt_rank``; the head dim K, the vocabulary, the experts, the SSM state and
the conv width stay). A leaf grows along the axes its shape letters name (:mod:`jscale.nn`): ``D``
the model width, ``F`` its part's width (``d_ff``, the routed or the shared experts' width, Mamba's
inner width), ``H``/``G`` the query/kv heads, ``J`` Mamba's Δ rank. The small model's units keep
the leading positions of every axis. Heads are laid out ``[G, H/G]`` (query head ``h`` reads kv
group ``h // (H/G)``), so old head ``(g, j)`` lands at ``g·H_big/G_big + j`` and keeps its kv group;
``n_kv_heads`` and ``n_heads / n_kv_heads`` may grow, not shrink.

* ``zero``: the small tensors in the leading block and every new entry 0, except in the
  constant-initialised leaves (norm scales, Mamba's ``A_log`` and ``D``, biases), whose new entries
  are ``cfg_big``'s init. New FFN units, heads, experts' units and Mamba channels get zero weights in
  and out, and new model features stay zero in the residual stream: F/H/G/J growth preserves the
  function exactly. **RMSNorm over a wider D**: with the new features zero the mean square over
  ``D_big`` is ``r = D_small/D_big`` times the small one, so the normalized old features come out
  ``sqrt(1/r)`` too large; every RMSNorm scale over D (its new entries the init 1) is multiplied
  by ``sqrt(r)``. The grown model then computes exactly the small model with the RMSNorms'
  epsilon ``eps/r`` (``sqrt(r)·rsqrt(r·ms + eps) = rsqrt(ms + eps/r)``) — preserved up to that
  change of epsilon, not exactly. A new unit whose weights in and out are all zero also gets
  zero gradient (a SwiGLU unit's ``silu(0)·0``; a feature nothing writes and the head reads with
  weight 0): zero growth leaves waking the new width to something else (noise, the ``random``
  operator).
* ``direct_width`` (Net2Net / bert2BERT's function-preserving expansion): every new unit copies an
  existing one. New FFN units, experts' units, Mamba channels and Δ ranks copy randomly chosen old
  ones (drawn with ``key``, one choice per kind for the whole model, as prts' bert2BERT draws one
  set of indices); a new kv group copies a random old group, and a new query head a random old head
  of the group its own group copies. Every weight that reads a copied unit (``w_o`` over heads,
  ``w_down`` over F, Mamba's x_proj and out_proj over F, dt_proj over J) is divided by the unit's
  number of copies: the function is preserved exactly. ``d_model`` grows only by an integer factor
  ``g``, deterministically: feature ``i`` copies feature ``i mod D_small``, so each appears ``g``
  times, the mean square — hence every RMSNorm's output — is unchanged exactly (epsilon included),
  and the readers of the normed features (linear maps, and the head, tied or not) are divided by
  ``g`` through the RMSNorm scales over D. Random duplicates of features would change the mean
  square in a way no scale undoes, so other factors are refused.

**Optimizer state.** :func:`grow_optimizer_state` grows every subtree of an optax state with the
parameters' tree structure and shapes (Adam's ``mu`` and ``nu`` in :func:`jscale.optim.
make_optimizer`'s ``inject_hyperparams(chain(clip, adamw))``) with the operator's maps: ``stack`` and
``interpolate`` copy the moments like the parameters; ``zero`` and ``direct_width`` move the old
entries to their new positions and zero the new ones (all of a new layer, for zero depth growth).
Moments are moved, not rescaled with the parameters; counts and hyperparameters are kept.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jscale import models, nn
from jscale.config import ConfigError, check
from jscale.models.parts.attention import Attention
from jscale.models.parts.base import Const
from jscale.models.parts.mamba_mixer import MambaMixer
from jscale.models.parts.moe import MoE
from jscale.models.parts.swiglu import SwiGLU

Array = jax.Array
Params = dict[str, Any]
Path = tuple[str, ...]

#: Config fields that change neither the parameter tree nor the function it computes (how it is
#: computed, the init, the training losses' coefficients): ``cfg_big`` may differ in them.
FREE_FIELDS = frozenset({"remat", "scan_layers", "attention_impl", "scan_impl", "scan_chunk",
                         "max_seq_len", "dtype", "param_dtype", "init_scale", "moe.impl",
                         "moe.load_balance_coeff", "moe.z_loss_coeff", "moe.bias_update_rate"})
#: The fields depth growth changes: both × g.
DEPTH_FIELDS = frozenset({"n_layers", "moe.first_dense_layers"})
#: The fields width growth may change, per family.
WIDTH_FIELDS = {"transformer": frozenset({"d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim",
                                          "moe.d_expert"}),
                "mamba": frozenset({"d_model", "expand", "dt_rank"})}
#: Where the new layers of zero depth growth go (see the module docstring).
PLACEMENTS = ("interleave", "end")

#: Per part, the leaves (path inside the part, one-layer name) that write its output into the
#: residual stream: zero them and the sub-layer is the identity.
_RESIDUAL_OUT: dict[type, frozenset[Path]] = {
    Attention: frozenset({("w_o_HKD",)}), SwiGLU: frozenset({("w_down_FD",)}),
    MoE: frozenset({("w_down_EFD",), ("shared", "w_down_FD")}),
    MambaMixer: frozenset({("w_out_FD",), ("b_out_D",)})}
#: Net2Net: the grown axes over which a leaf (one-layer name) *reads* a unit — divided by the
#: unit's copies. D is not listed: its readers are divided through the RMSNorm scales.
_READS = {"w_o_HKD": "H", "w_down_FD": "F", "w_down_EFD": "F", "w_x_dt_FJ": "F", "w_x_b_FN": "F",
          "w_x_c_FN": "F", "w_dt_JF": "J", "w_out_FD": "F"}
#: Width kinds (see :func:`_widths`) → the config field behind them, for error messages.
_WIDTH_FIELD = {"D": "model.d_model", "G": "model.n_kv_heads", "R": "model.n_heads",
                "K": "model.head_dim", "ffn": "model.d_ff", "expert": "model.moe.d_expert",
                "shared": "model.moe.d_expert", "E": "model.moe.n_experts",
                "inner": "model.expand", "rank": "model.dt_rank"}
_WIDTH_WHAT = {"D": "model width", "G": "kv heads", "R": "query heads per kv group (n_heads / "
               "n_kv_heads)", "ffn": "FFN width", "expert": "routed experts' width (model.d_ff "
               "when unset)", "shared": "shared experts' width", "inner": "inner width "
               "(expand · d_model)", "rank": "Δ rank"}


# ---------------------------------------------------------------------------------------------------
# the table


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
    ``cfg_big`` model (see the module docstring and :data:`OPERATORS`). ``key`` feeds the random
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
    return _grown(params_small, key, cfg_small=cfg_small, cfg_big=cfg_big, plan=_stack_plan,
                  options=())


def interpolate(params_small: Params, cfg_small: Any, cfg_big: Any,
                key: Array | None = None) -> Params:
    """Each layer repeated ``g`` times in place (``0, 0, 1, 1, …``); ``key`` unused."""
    return _grown(params_small, key, cfg_small=cfg_small, cfg_big=cfg_big,
                  plan=_interpolate_plan, options=())


def zero(params_small: Params, cfg_small: Any, cfg_big: Any, key: Array | None = None, *,
         placement: str = "interleave") -> Params:
    """G_zero: new layers that are identity blocks (depth, when ``n_layers`` grows; ``placement``
    ``"interleave"`` or ``"end"``) or new units with zero weights (width); see the module
    docstring for what is preserved exactly. ``key`` unused."""
    return _grown(params_small, key, cfg_small=cfg_small, cfg_big=cfg_big, plan=_zero_plan,
                  options=(("placement", placement),))


def direct_width(params_small: Params, cfg_small: Any, cfg_big: Any,
                 key: Array | None = None) -> Params:
    """Net2Net/bert2BERT width growth: new units copy old ones (chosen with ``key``), their readers
    divided among the copies; ``d_model`` by an integer factor. Function-preserving."""
    return _grown(params_small, key, cfg_small=cfg_small, cfg_big=cfg_big,
                  plan=_direct_width_plan, options=())


def grow_optimizer_state(opt_state_small: Any, params_small: Params, cfg_small: Any, cfg_big: Any,
                         op: str, *, key: Array | None = None, **options: Any) -> Any:
    """``opt_state_small`` (an optax state for ``params_small``) with every subtree that mirrors the
    parameters (same tree structure and shapes: Adam's ``mu``, ``nu``) grown by ``op``'s maps —
    copies for ``stack``/``interpolate``, old entries moved and new ones zero for ``zero`` and
    ``direct_width`` — and everything else (counts, hyperparameters) kept. Pass the ``key`` and
    ``options`` given to :func:`grow`, so the moments follow the same choices."""
    found = operator(op)
    _check_params(params_small, cfg_small)
    return _grown_moments(opt_state_small, key, treedef=jax.tree.structure(params_small),
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
# plans: how each leaf grows


@dataclasses.dataclass(frozen=True)
class _LeafPlan:
    """One leaf's growth: ``take`` each ``(axis, index)`` (big position ← small position); then for
    the parameters set the ``reset`` entries to ``fill`` and multiply by ``factor``, for the moments
    zero the ``new`` entries (masks and factor broadcast against the grown leaf)."""

    gathers: tuple[tuple[int, Array], ...]
    new: Array | None = None
    reset: Array | None = None
    fill: Any = 0.0
    factor: Array | float | None = None


def _apply(tree: Params, plans: dict[Path, _LeafPlan], *, moments: bool) -> Params:
    def leaf(path, x):
        plan = plans.get(_path(path))
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
def _grown(params_small: Params, key: Array | None, *, cfg_small: Any, cfg_big: Any,
           plan: Callable[..., dict[Path, _LeafPlan]], options: tuple) -> Params:
    """The parameters grown by ``plan`` (one compiled program; the checks run as it traces)."""
    _check_params(params_small, cfg_small)
    out = _apply(params_small, plan(cfg_small, cfg_big, key, **dict(options)), moments=False)
    want = _abstract(cfg_big)
    if jax.tree.structure(out) != jax.tree.structure(want) or any(
            x.shape != w.shape for x, w in zip(jax.tree.leaves(out), jax.tree.leaves(want),
                                               strict=True)):
        raise AssertionError("growth made a tree unlike cfg_big's init (a bug in jscale.growth)")
    return jax.tree.map(lambda x, w: x.astype(w.dtype), out, want)


@functools.partial(jax.jit, static_argnames=("treedef", "shapes", "cfg_small", "cfg_big", "plan",
                                             "options"))
def _grown_moments(opt_state: Any, key: Array | None, *, treedef: Any, shapes: tuple,
                   cfg_small: Any, cfg_big: Any, plan: Callable[..., dict[Path, _LeafPlan]],
                   options: tuple) -> Any:
    """``opt_state`` with its subtrees of the parameters' structure and ``shapes`` grown."""
    plans = plan(cfg_small, cfg_big, key, **dict(options))
    grown = []

    def mirrors(node: Any) -> bool:
        leaves, td = jax.tree.flatten(node)
        return td == treedef and tuple(tuple(jnp.shape(x)) for x in leaves) == shapes

    def visit(node: Any) -> Any:
        if not mirrors(node):
            return node
        grown.append(node)
        return _apply(node, plans, moments=True)

    out = jax.tree.map(visit, opt_state, is_leaf=mirrors)
    if not grown:
        raise ValueError("opt_state_small: no subtree has the parameters' tree structure and shapes "
                         "(Adam's mu/nu); nothing to grow")
    return out


def _stack_plan(cfg_small: Any, cfg_big: Any, key: Array | None = None) -> dict[Path, _LeafPlan]:
    return _depth_plan(cfg_small, cfg_big, "stack", in_place=False)


def _interpolate_plan(cfg_small: Any, cfg_big: Any,
                      key: Array | None = None) -> dict[Path, _LeafPlan]:
    return _depth_plan(cfg_small, cfg_big, "interpolate", in_place=True)


def _zero_plan(cfg_small: Any, cfg_big: Any, key: Array | None = None, *,
               placement: str = "interleave") -> dict[Path, _LeafPlan]:
    check(placement in PLACEMENTS, "placement", f"must be one of {PLACEMENTS}", placement)
    _check_pair(cfg_small, cfg_big, "zero")
    if _spec(cfg_big).n_layers != _spec(cfg_small).n_layers:
        return _depth_plan(cfg_small, cfg_big, "zero", in_place=placement == "interleave")
    return _width_plan(cfg_small, cfg_big, "zero", key)


def _direct_width_plan(cfg_small: Any, cfg_big: Any,
                       key: Array | None = None) -> dict[Path, _LeafPlan]:
    return _width_plan(cfg_small, cfg_big, "direct_width", key)


def _depth_plan(cfg_small: Any, cfg_big: Any, op: str, *, in_place: bool) -> dict[Path, _LeafPlan]:
    """Every stack's leaves gathered on ``L`` (``g·L`` positions); for ``zero`` the new layers'
    residual outputs reset to 0 and their moments zeroed."""
    g = _check_depth(cfg_small, cfg_big, op)
    spec = _spec(cfg_small)
    parts, _ = _layout(spec)
    steps = {st.key: st.n_steps for st in spec.layer_stacks}
    plans = {}
    for path, x in _leaves(_abstract(cfg_small)):
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
                if type(part) not in _RESIDUAL_OUT:
                    raise ValueError(f"zero depth growth: which leaves of {type(part).__name__} "
                                     f"write the residual stream is not known ({path[1]!r})")
                if (*path[2:-1], nn.unstack_name(path[-1])) in _RESIDUAL_OUT[type(part)]:
                    reset = new
        plans[path] = _LeafPlan(((0, index),), new=new, reset=reset)
    return plans


def _width_plan(cfg_small: Any, cfg_big: Any, op: str,
                key: Array | None) -> dict[Path, _LeafPlan]:
    """Every leaf gathered along its grown axes (see the module docstring, **Width**)."""
    ws, wb = _check_width(cfg_small, cfg_big, op)
    copy = op == "direct_width"
    maps = _width_maps(ws, wb, key if copy else None, copy)
    spec_s = _spec(cfg_small)
    parts, norms = _layout(spec_s)
    fills = {} if copy else _const_fills(_spec(cfg_big))
    r = ws["D"] / wb["D"]
    norm_factor = r if copy else math.sqrt(r)
    plans = {}
    for path, x in _leaves(_abstract(cfg_small)):
        part = parts.get(path[:2])
        inner = (*path[2:-1], nn.unstack_name(path[-1]))
        letters = path[-1].rsplit("_", 1)[-1]
        if not (letters.isupper() and len(letters) == x.ndim):
            raise ValueError(f"growth reads a leaf's axes from its name's shape letters: "
                             f"{'.'.join(path)} has shape {x.shape}")
        gathers, new, factor = [], None, None
        for axis, letter in enumerate(letters):
            grown = maps.get(_kind(letter, part, inner))
            if grown is None:
                continue
            shape = [1] * x.ndim
            shape[axis] = -1
            gathers.append((axis, grown.index))
            mask = grown.new.reshape(shape)
            new = mask if new is None else new | mask
            if copy and letter in _READS.get(inner[-1], ""):
                div = (1.0 / grown.copies).reshape(shape)
                factor = div if factor is None else factor * div
        if "D" in maps and (path == ("final_norm", "scale_D") or path[:2] in norms):
            factor = norm_factor  # an RMSNorm scale over D (its only grown axis)
        if gathers or factor is not None:
            plans[path] = _LeafPlan(tuple(gathers), new=new, reset=None if copy else new,
                                    fill=fills.get(path, 0.0), factor=factor)
    return plans


# ---------------------------------------------------------------------------------------------------
# index maps


@dataclasses.dataclass(frozen=True)
class _Map:
    """How one axis grows: big position ``i`` takes small position ``index[i]``; ``new[i]``: ``i``
    is not one of the small positions; ``copies[i]``: how many big positions take ``index[i]``."""

    index: Array
    new: Array
    copies: Array


def _map(index: Array, new: Array, n_small: int) -> _Map:
    index = index.astype(jnp.int32)
    copies = jnp.bincount(index, length=n_small).astype(jnp.float32)[index]
    return _Map(index, new, copies)


def _leading(n_small: int, n_big: int, key: Array | None) -> _Map:
    """The small positions first, then new ones: copies of random small positions (``key``) or
    placeholders (no key: the zero operator)."""
    extra = (jnp.zeros((n_big - n_small,), jnp.int32) if key is None
             else jax.random.randint(key, (n_big - n_small,), 0, n_small))
    return _map(jnp.concatenate([jnp.arange(n_small), extra]), jnp.arange(n_big) >= n_small,
                n_small)


def _heads(G_s: int, R_s: int, G_b: int, R_b: int, key: Array | None) -> tuple[_Map, _Map]:
    """``(kv groups, query heads)``: head ``(g, j)`` (at ``g·R + j``) stays in its group; with
    ``key``, a new group copies a random old group and a new head a random head of the old group
    its group copies."""
    key_g = key_j = None
    if key is not None:
        key_g, key_j = jax.random.split(key)
    groups = _leading(G_s, G_b, key_g)
    i = jnp.arange(G_b * R_b)
    g, j = i // R_b, i % R_b
    extra = 0 if key is None else jax.random.randint(key_j, i.shape, 0, R_s)
    index = groups.index[g] * R_s + jnp.where(j < R_s, j, extra)
    return groups, _map(index, (g >= G_s) | (j >= R_s), G_s * R_s)


def _width_maps(ws: dict[str, int], wb: dict[str, int], key: Array | None,
                copy: bool) -> dict[str, _Map]:
    """The maps of every grown width kind (``D``, ``G``/``H``, ``ffn``, ``expert``, ``shared``,
    ``inner``, ``rank``)."""
    random_kinds = [k for k in ("G", "R", "ffn", "expert", "shared", "inner", "rank")
                    if k in ws and wb[k] != ws[k]]
    if copy and random_kinds and key is None:
        raise ValueError(f"grow('direct_width'): choosing which units to copy needs a key (it grows "
                         f"{', '.join(_WIDTH_FIELD[k] for k in random_kinds)}); pass key=")

    def sub(i):
        return None if key is None else jax.random.fold_in(key, i)
    maps = {}
    D_s, D_b = ws["D"], wb["D"]
    if D_b != D_s:
        i = jnp.arange(D_b)
        maps["D"] = (_map(i % D_s, i >= D_s, D_s) if copy else _leading(D_s, D_b, None))
    if "G" in ws and (wb["G"], wb["R"]) != (ws["G"], ws["R"]):
        maps["G"], maps["H"] = _heads(ws["G"], ws["R"], wb["G"], wb["R"], sub(0))
    for i, kind in enumerate(("ffn", "expert", "shared", "inner", "rank"), 1):
        if kind in ws and wb[kind] != ws[kind]:
            maps[kind] = _leading(ws[kind], wb[kind], sub(i))
    return maps


def _kind(letter: str, part: Any, inner: Path) -> str | None:
    """The width kind of axis ``letter`` of a leaf of ``part`` (``None``: not grown)."""
    if letter == "F":
        if isinstance(part, SwiGLU):
            return "ffn"
        if isinstance(part, MoE):
            return "shared" if inner[0] == "shared" else "expert"
        if isinstance(part, MambaMixer):
            return "inner"
        raise ValueError(f"growth: the F axis of {'.'.join(inner)} belongs to no known part")
    return {"D": "D", "G": "G", "H": "H", "J": "rank"}.get(letter)


# ---------------------------------------------------------------------------------------------------
# validation


def _check_pair(cfg_small: Any, cfg_big: Any, op: str) -> str:
    """The family of both configs; refuses two families, or one the operator does not support."""
    if type(cfg_big) is not type(cfg_small):
        raise ConfigError(f"model: {op!r} grows a model within its family; cfg_small is a "
                          f"{type(cfg_small).__name__}, cfg_big a {type(cfg_big).__name__}")
    family = models.family_of(cfg_small).name
    supported = OPERATORS[op].families
    check(family in supported, "model", f"growth operator {op!r} supports the families {supported}",
          family)
    return family


def _difference(a: Any, b: Any, skip: frozenset[str], prefix: str = "") -> tuple | None:
    """The first field (dotted, nested configs walked into) where configs ``a`` and ``b`` differ,
    with both values; ``None`` if they agree outside ``skip``."""
    for f in dataclasses.fields(a):
        name = prefix + f.name
        if name in skip:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and type(x) is type(y):
            found = _difference(x, y, skip, name + ".")
            if found:
                return found
        elif x != y:
            return name, x, y
    return None


def _check_same(cfg_small: Any, cfg_big: Any, op: str, grown: frozenset[str], what: str) -> None:
    found = _difference(cfg_small, cfg_big, FREE_FIELDS | grown)
    if found:
        name, x, y = found
        raise ConfigError(f"model.{name}: {op!r} {what} and keeps the rest of the model: needs the "
                          f"small model's {x!r}, got {y!r} (grow depth and width in two calls)")


def _check_depth(cfg_small: Any, cfg_big: Any, op: str) -> int:
    """The depth factor ``g`` (see the module docstring, **Depth**, for what is refused)."""
    family = _check_pair(cfg_small, cfg_big, op)
    n, m = _spec(cfg_small).n_layers, _spec(cfg_big).n_layers
    check(m % n == 0 and m >= 2 * n, "model.n_layers", f"{op!r} grows depth by an integer factor "
          f"g >= 2 of the small model's {n} layers ({2 * n}, {3 * n}, ...)", m)
    g = m // n
    _check_same(cfg_small, cfg_big, op, DEPTH_FIELDS, "grows only the depth (model.n_layers)")
    if family == "transformer" and cfg_small.moe is not None:
        f = cfg_small.moe.first_dense_layers
        check(cfg_big.moe.first_dense_layers == g * f, "model.moe.first_dense_layers",
              f"{op!r} by {g} repeats every stack {g} times, so it needs {g * f}",
              cfg_big.moe.first_dense_layers)
    need = {st.key: g * st.n_steps for st in _spec(cfg_small).layer_stacks}
    got = {st.key: st.n_steps for st in _spec(cfg_big).layer_stacks}
    check(got == need, "model.n_layers",
          f"{op!r} by {g} repeats every stack of the small model {g} times, which needs the stacks "
          f"{need}; cfg_big's layer pattern makes {got} (the dense layers after the last whole MoE "
          f"period, {g}-fold, must stay fewer than model.moe.every)", m)
    return g


def _check_width(cfg_small: Any, cfg_big: Any, op: str) -> tuple[dict[str, int], dict[str, int]]:
    """The small and big widths (see the module docstring, **Width**, for what is refused)."""
    family = _check_pair(cfg_small, cfg_big, op)
    n, m = _spec(cfg_small).n_layers, _spec(cfg_big).n_layers
    check(m == n, "model.n_layers", f"{op!r} grows the width, so it needs the small model's {n} "
          "layers (grow depth and width in two calls)", m)
    _check_same(cfg_small, cfg_big, op, WIDTH_FIELDS[family], "grows only the width")
    ws, wb = _widths(_spec(cfg_small)), _widths(_spec(cfg_big))
    if "K" in ws:
        check(wb["K"] == ws["K"], "model.head_dim", f"width growth keeps the head dim {ws['K']} "
              "(RoPE's frequencies depend on it; unset, it is d_model / n_heads, so n_heads must "
              "grow with d_model)", wb["K"])
    for kind, what in _WIDTH_WHAT.items():
        if kind in ws:
            check(wb[kind] >= ws[kind], _WIDTH_FIELD[kind],
                  f"{op!r} cannot shrink the {what} ({ws[kind]})", wb[kind])
    if wb == ws:
        raise ConfigError(f"model: {op!r} needs a wider cfg_big; it has the small model's widths")
    if op == "direct_width":
        check(wb["D"] % ws["D"] == 0, "model.d_model", f"'direct_width' grows d_model only by an "
              f"integer factor of the small model's {ws['D']} (each feature copied g times keeps "
              "every RMSNorm exact; random copies would not)", wb["D"])
    return ws, wb


def _check_params(params: Params, cfg: Any) -> None:
    """``params`` must have ``cfg``'s tree and shapes (``ValueError`` naming the first leaf off)."""
    want = _abstract(cfg)
    if jax.tree.structure(params) != jax.tree.structure(want):
        raise ValueError(f"params_small: the tree does not match cfg_small's parameters "
                         f"({jax.tree.structure(params)} vs {jax.tree.structure(want)})")
    for (path, x), w in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(want), strict=True):
        if tuple(jnp.shape(x)) != w.shape:
            raise ValueError(f"params_small: {jax.tree_util.keystr(path)} has shape "
                             f"{tuple(jnp.shape(x))}; cfg_small's has {w.shape}")


# ---------------------------------------------------------------------------------------------------
# the model, as growth sees it


def _spec(cfg: Any):
    """The scaffold's description of ``cfg`` (the supported families are scaffold families)."""
    return models.family_of(cfg).spec(cfg)


@functools.lru_cache(maxsize=64)
def _abstract(cfg: Any) -> Params:
    """``cfg``'s parameter tree as shapes and dtypes."""
    return jax.eval_shape(lambda k: models.init(k, cfg), jax.random.PRNGKey(0))


def _path(keys) -> Path:
    return tuple(str(k.key) for k in keys)


def _leaves(tree: Params) -> list[tuple[Path, Any]]:
    return [(_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _layout(spec) -> tuple[dict[tuple[str, str], Any], set[tuple[str, str]]]:
    """``({(stack key, sub-layer name): part}, {(stack key, norm name)})``."""
    parts, norms = {}, set()
    for st in spec.layer_stacks:
        for sub in st.block:
            parts[(st.key, sub.name)] = sub.part
            norms.add((st.key, sub.norm))
    return parts, norms


def _widths(spec) -> dict[str, int]:
    """The model's widths by kind: ``D``; attention's ``G``, ``R`` (heads per group), ``K``; the
    FFN's ``ffn``; MoE's ``expert``, ``shared``, ``E``; Mamba's ``inner``, ``rank``. (Parts of a
    kind have the same widths in every layer of the families here.)"""
    out = {"D": spec.d_model}
    for st in spec.layer_stacks:
        for sub in st.block:
            p = sub.part
            if isinstance(p, Attention):
                out.update(G=p.n_kv_heads, R=p.n_heads // p.n_kv_heads, K=p.head_dim)
            elif isinstance(p, SwiGLU):
                out.update(ffn=p.d_ff)
            elif isinstance(p, MoE):
                out.update(expert=p.d_expert, shared=p.d_shared, E=p.n_experts)
            elif isinstance(p, MambaMixer):
                out.update(inner=p.d_inner, rank=p.dt_rank)
            else:
                raise ValueError(f"growth knows no part {type(p).__name__} (sub-layer {sub.name!r})")
    return out


def _const_fills(spec) -> dict[Path, Any]:
    """The init of every constant-initialised leaf (a number, or a one-layer array): the residual
    RMSNorm scales (1, as :func:`jscale.models.lm.init` makes them) and the parts' ``Const``
    leaves."""
    out: dict[Path, Any] = {("final_norm", "scale_D"): 1.0}
    for st in spec.layer_stacks:
        for sub in st.block:
            out[(st.key, sub.norm, "scale_LD")] = 1.0
            for leaf in sub.part.leaves():
                if isinstance(leaf.init, Const):
                    fill = leaf.init.fill() if callable(leaf.init.fill) else leaf.init.fill
                    out[(st.key, sub.name, *leaf.path[:-1], nn.stack_name(leaf.path[-1]))] = fill
    return out


# ---------------------------------------------------------------------------------------------------

_BOTH = ("transformer", "mamba")
_TODO = ("needs the training-loop integration (jscale.core), which the lead builds")

#: Every operator of Du et al. 2024 (G_direct as ``stack``/``interpolate``/``direct_width``,
#: G_zero, G_random, G_learn), implemented or not (``supported``).
OPERATORS: dict[str, Operator] = {op.name: op for op in (
    Operator("stack", "depth", False, _BOTH, True, stack, _stack_plan,
             "G_stack: each stack repeated whole g times (0..L-1, 0..L-1, ...); embedding, final "
             "norm and head copied"),
    Operator("interpolate", "depth", False, _BOTH, True, interpolate, _interpolate_plan,
             "each layer (an MoE period) repeated g times in place (0, 0, 1, 1, ...)"),
    Operator("zero", "depth or width", True, _BOTH, True, zero, _zero_plan,
             "G_zero: identity new layers (zero residual outputs), exact; or zero new units, exact "
             "for d_ff/heads/experts' width, and for d_model up to the RMSNorm epsilon becoming "
             "eps·D_big/D_small"),
    Operator("direct_width", "width", True, _BOTH, True, direct_width, _direct_width_plan,
             "Net2Net/bert2BERT: new units copy random old ones, readers divided among the copies; "
             "d_model by an integer factor; exact"),
    Operator("random", "depth or width", False, _BOTH, False, None, None,
             "G_random: the new parameters freshly initialised (and masked in gradually); " + _TODO),
    Operator("learn", "depth or width", False, _BOTH, False, None, None,
             "G_learn (LiGO): a linear growth map trained on the big model's loss; " + _TODO),
)}
