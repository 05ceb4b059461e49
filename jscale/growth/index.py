"""The model as growth sees it, and the index maps of width growth (:mod:`jscale.growth`).

A grown leaf is a gather of the small leaf along the axes its shape letters name (:mod:`jscale.nn`);
this module reads those letters, the scaffold's layer stacks and parts (:mod:`jscale.models.lm`)
and the model's widths by kind, and builds the per-axis maps (big position ← small position) that
:mod:`jscale.growth.plans` applies.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jscale import models, nn
from jscale.models.parts.attention import Attention
from jscale.models.parts.base import Const
from jscale.models.parts.mamba_mixer import MambaMixer
from jscale.models.parts.moe import MoE
from jscale.models.parts.swiglu import SwiGLU

Array = jax.Array
Params = dict[str, Any]
Path = tuple[str, ...]

#: Per part, the leaves (path inside the part, one-layer name) that write its output into the
#: residual stream: zero them and the sub-layer is the identity.
RESIDUAL_OUT: dict[type, frozenset[Path]] = {
    Attention: frozenset({("w_o_HKD",)}), SwiGLU: frozenset({("w_down_FD",)}),
    MoE: frozenset({("w_down_EFD",), ("shared", "w_down_FD")}),
    MambaMixer: frozenset({("w_out_FD",), ("b_out_D",)})}
#: Net2Net: the grown axes over which a leaf (one-layer name) *reads* a unit — divided by the
#: unit's copies. D is not listed: its readers are divided through the RMSNorm scales.
READS = {"w_o_HKD": "H", "w_down_FD": "F", "w_down_EFD": "F", "w_x_dt_FJ": "F", "w_x_b_FN": "F",
         "w_x_c_FN": "F", "w_dt_JF": "J", "w_out_FD": "F"}
#: Width kinds (see :func:`widths`) → the config field behind them, for error messages.
WIDTH_FIELD = {"D": "model.d_model", "G": "model.n_kv_heads", "R": "model.n_heads",
               "K": "model.head_dim", "ffn": "model.d_ff", "expert": "model.moe.d_expert",
               "shared": "model.moe.d_expert", "E": "model.moe.n_experts",
               "inner": "model.expand", "rank": "model.dt_rank"}
#: Width kinds → what they are, for error messages.
WIDTH_WHAT = {"D": "model width", "G": "kv heads", "R": "query heads per kv group (n_heads / "
              "n_kv_heads)", "ffn": "FFN width", "expert": "routed experts' width (model.d_ff "
              "when unset)", "shared": "shared experts' width", "inner": "inner width "
              "(expand · d_model)", "rank": "Δ rank"}


# ---------------------------------------------------------------------------------------------------
# index maps


@dataclasses.dataclass(frozen=True)
class AxisMap:
    """How one axis grows: big position ``i`` takes small position ``index[i]``; ``new[i]``: ``i``
    is not one of the small positions; ``copies[i]``: how many big positions take ``index[i]``."""

    index: Array
    new: Array
    copies: Array


def make_map(index: Array, new: Array, n_small: int) -> AxisMap:
    """The :class:`AxisMap` of ``index`` and ``new`` (its ``copies`` counted over ``n_small``)."""
    index = index.astype(jnp.int32)
    copies = jnp.bincount(index, length=n_small).astype(jnp.float32)[index]
    return AxisMap(index, new, copies)


def leading(n_small: int, n_big: int, key: Array | None) -> AxisMap:
    """The small positions first, then new ones: copies of random small positions (``key``) or
    placeholders (no key: the zero operator)."""
    extra = (jnp.zeros((n_big - n_small,), jnp.int32) if key is None
             else jax.random.randint(key, (n_big - n_small,), 0, n_small))
    return make_map(jnp.concatenate([jnp.arange(n_small), extra]), jnp.arange(n_big) >= n_small,
                    n_small)


def head_maps(G_s: int, R_s: int, G_b: int, R_b: int,
              key: Array | None) -> tuple[AxisMap, AxisMap]:
    """``(kv groups, query heads)``: head ``(g, j)`` (at ``g·R + j``) stays in its group; with
    ``key``, a new group copies a random old group and a new head a random head of the old group
    its group copies."""
    key_g = key_j = None
    if key is not None:
        key_g, key_j = jax.random.split(key)
    groups = leading(G_s, G_b, key_g)
    i = jnp.arange(G_b * R_b)
    g, j = i // R_b, i % R_b
    extra = 0 if key is None else jax.random.randint(key_j, i.shape, 0, R_s)
    index = groups.index[g] * R_s + jnp.where(j < R_s, j, extra)
    return groups, make_map(index, (g >= G_s) | (j >= R_s), G_s * R_s)


def width_maps(ws: dict[str, int], wb: dict[str, int], key: Array | None,
               copy: bool) -> dict[str, AxisMap]:
    """The maps of every grown width kind (``D``, ``G``/``H``, ``ffn``, ``expert``, ``shared``,
    ``inner``, ``rank``)."""
    random_kinds = [k for k in ("G", "R", "ffn", "expert", "shared", "inner", "rank")
                    if k in ws and wb[k] != ws[k]]
    if copy and random_kinds and key is None:
        raise ValueError(f"grow('direct_width'): choosing which units to copy needs a key (it grows "
                         f"{', '.join(WIDTH_FIELD[k] for k in random_kinds)}); pass key=")

    def sub(i):
        return None if key is None else jax.random.fold_in(key, i)
    maps = {}
    D_s, D_b = ws["D"], wb["D"]
    if D_b != D_s:
        i = jnp.arange(D_b)
        maps["D"] = (make_map(i % D_s, i >= D_s, D_s) if copy else leading(D_s, D_b, None))
    if "G" in ws and (wb["G"], wb["R"]) != (ws["G"], ws["R"]):
        maps["G"], maps["H"] = head_maps(ws["G"], ws["R"], wb["G"], wb["R"], sub(0))
    for i, kind in enumerate(("ffn", "expert", "shared", "inner", "rank"), 1):
        if kind in ws and wb[kind] != ws[kind]:
            maps[kind] = leading(ws[kind], wb[kind], sub(i))
    return maps


def axis_kind(letter: str, part: Any, inner: Path) -> str | None:
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
# the model, as growth sees it


def model_spec(cfg: Any):
    """The scaffold's description of ``cfg`` (the supported families are scaffold families)."""
    return models.family_of(cfg).spec(cfg)


@functools.lru_cache(maxsize=64)
def abstract(cfg: Any) -> Params:
    """``cfg``'s parameter tree as shapes and dtypes."""
    return jax.eval_shape(lambda k: models.init(k, cfg), jax.random.PRNGKey(0))


def key_path(keys) -> Path:
    """A ``jax.tree_util`` key path as a tuple of dict keys."""
    return tuple(str(k.key) for k in keys)


def named_leaves(tree: Params) -> list[tuple[Path, Any]]:
    """``[(path, leaf)]`` of a parameter tree, paths as :func:`key_path` tuples."""
    return [(key_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def layout(spec) -> tuple[dict[tuple[str, str], Any], set[tuple[str, str]]]:
    """``({(stack key, sub-layer name): part}, {(stack key, norm name)})``."""
    parts, norms = {}, set()
    for st in spec.layer_stacks:
        for sub in st.block:
            parts[(st.key, sub.name)] = sub.part
            norms.add((st.key, sub.norm))
    return parts, norms


def widths(spec) -> dict[str, int]:
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


def const_fills(spec) -> dict[Path, Any]:
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

