"""What growth refuses (:mod:`jscale.growth`): a pair of configs that no operator call can map one
onto the other, and parameters that are not the small config's. Every refusal is a
:class:`~jscale.config.ConfigError` naming the field (``ValueError`` for the parameters)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jscale import models
from jscale.config import ConfigError, check
from jscale.growth.index import WIDTH_FIELD, WIDTH_WHAT, Params, abstract, model_spec, widths

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

#: The model families (registry names) each operator of :data:`jscale.growth.OPERATORS` supports
#: (its ``families`` column; ``"transformer"`` includes MoE).
FAMILIES: dict[str, tuple[str, ...]] = {op: ("transformer", "mamba") for op in (
    "stack", "interpolate", "zero", "direct_width", "random", "learn")}


def check_pair(cfg_small: Any, cfg_big: Any, op: str) -> str:
    """The family of both configs; refuses two families, or one the operator does not support."""
    if type(cfg_big) is not type(cfg_small):
        raise ConfigError(f"model: {op!r} grows a model within its family; cfg_small is a "
                          f"{type(cfg_small).__name__}, cfg_big a {type(cfg_big).__name__}")
    family = models.family_of(cfg_small).name
    supported = FAMILIES[op]
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


def check_same(cfg_small: Any, cfg_big: Any, op: str, grown: frozenset[str], what: str) -> None:
    """Refuse ``cfg_big`` if it differs from ``cfg_small`` outside :data:`FREE_FIELDS` and
    ``grown`` (the operator's fields; ``what`` says what it grows), naming the first such field."""
    found = _difference(cfg_small, cfg_big, FREE_FIELDS | grown)
    if found:
        name, x, y = found
        raise ConfigError(f"model.{name}: {op!r} {what} and keeps the rest of the model: needs the "
                          f"small model's {x!r}, got {y!r} (grow depth and width in two calls)")


def check_depth(cfg_small: Any, cfg_big: Any, op: str) -> int:
    """The depth factor ``g`` (see :mod:`jscale.growth`, **Depth**, for what is refused)."""
    family = check_pair(cfg_small, cfg_big, op)
    n, m = model_spec(cfg_small).n_layers, model_spec(cfg_big).n_layers
    check(m % n == 0 and m >= 2 * n, "model.n_layers", f"{op!r} grows depth by an integer factor "
          f"g >= 2 of the small model's {n} layers ({2 * n}, {3 * n}, ...)", m)
    g = m // n
    check_same(cfg_small, cfg_big, op, DEPTH_FIELDS, "grows only the depth (model.n_layers)")
    if family == "transformer" and cfg_small.moe is not None:
        f = cfg_small.moe.first_dense_layers
        check(cfg_big.moe.first_dense_layers == g * f, "model.moe.first_dense_layers",
              f"{op!r} by {g} repeats every stack {g} times, so it needs {g * f}",
              cfg_big.moe.first_dense_layers)
    need = {st.key: g * st.n_steps for st in model_spec(cfg_small).layer_stacks}
    got = {st.key: st.n_steps for st in model_spec(cfg_big).layer_stacks}
    check(got == need, "model.n_layers",
          f"{op!r} by {g} repeats every stack of the small model {g} times, which needs the stacks "
          f"{need}; cfg_big's layer pattern makes {got} (the dense layers after the last whole MoE "
          f"period, {g}-fold, must stay fewer than model.moe.every)", m)
    return g


def check_width(cfg_small: Any, cfg_big: Any, op: str) -> tuple[dict[str, int], dict[str, int]]:
    """The small and big widths (see :mod:`jscale.growth`, **Width**, for what is refused)."""
    family = check_pair(cfg_small, cfg_big, op)
    n, m = model_spec(cfg_small).n_layers, model_spec(cfg_big).n_layers
    check(m == n, "model.n_layers", f"{op!r} grows the width, so it needs the small model's {n} "
          "layers (grow depth and width in two calls)", m)
    check_same(cfg_small, cfg_big, op, WIDTH_FIELDS[family], "grows only the width")
    ws, wb = widths(model_spec(cfg_small)), widths(model_spec(cfg_big))
    if "K" in ws:
        check(wb["K"] == ws["K"], "model.head_dim", f"width growth keeps the head dim {ws['K']} "
              "(RoPE's frequencies depend on it; unset, it is d_model / n_heads, so n_heads must "
              "grow with d_model)", wb["K"])
    for kind, what in WIDTH_WHAT.items():
        if kind in ws:
            check(wb[kind] >= ws[kind], WIDTH_FIELD[kind],
                  f"{op!r} cannot shrink the {what} ({ws[kind]})", wb[kind])
    if wb == ws:
        raise ConfigError(f"model: {op!r} needs a wider cfg_big; it has the small model's widths")
    if op == "direct_width":
        check(wb["D"] % ws["D"] == 0, "model.d_model", f"'direct_width' grows d_model only by an "
              f"integer factor of the small model's {ws['D']} (each feature copied g times keeps "
              "every RMSNorm exact; random copies would not)", wb["D"])
    return ws, wb


def check_params(params: Params, cfg: Any) -> None:
    """``params`` must have ``cfg``'s tree and shapes (``ValueError`` naming the first leaf off)."""
    want = abstract(cfg)
    if jax.tree.structure(params) != jax.tree.structure(want):
        raise ValueError(f"params_small: the tree does not match cfg_small's parameters "
                         f"({jax.tree.structure(params)} vs {jax.tree.structure(want)})")
    for (path, x), w in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(want), strict=True):
        if tuple(jnp.shape(x)) != w.shape:
            raise ValueError(f"params_small: {jax.tree_util.keystr(path)} has shape "
                             f"{tuple(jnp.shape(x))}; cfg_small's has {w.shape}")

