"""Exact padded packing: members of different widths and depths zero-padded to one shape, so that
one compiled (vmapped) program trains them all, each exactly as it would train alone.

**The group.** :func:`padded_config` takes the members' model configs and returns the padded one:
the largest of every padded size, everything else shared. A member's parameters go into the padded
shape with :func:`pack_params` (and come back with :func:`unpack_params`): its true block at the
leading positions of every axis, zeros everywhere else — norm scales and whole padded *layers*
included. Its true sizes travel as data, in its model state (:func:`pack_state`, the entry
``model_state["pack"]``: ``TrainState.model_state`` is vmapped per member and checkpointed), so one
program serves members of different true sizes. :func:`init_packed` is a member's init in the padded
shape (its own init, drawn for its own config from the same key — the true fan-in std and the same
values as an unpadded run of that seed — then packed); :func:`padding_mask` marks every padded
entry, :func:`padding_waste` the compute the padding costs.

**Padded sizes, by family** (shape letters of :mod:`jscale.nn`):

* dense transformer: ``D`` (``d_model``), ``L`` (``n_layers``), ``G`` (``n_kv_heads``), the query
  heads per kv group ``R = H / G``, ``F`` (``d_ff``); ``H = max G · max R`` (which may exceed every
  member's ``n_heads``). Shared: the head dim ``K`` and the vocabulary ``V`` (and every other field).
  Heads are laid out ``[G, R]`` (query head ``h`` reads kv group ``h // R``, as
  ``jax.nn.dot_product_attention`` groups them and :func:`jscale.growth.index.head_maps` maps
  them): a member's head ``(g, j)`` sits at ``g · R_pad + j``, so it keeps its own kv group.
  Mixture-of-experts members are not packable yet.
* Mamba-1: ``D``, ``L``, the inner width ``F = expand · D``, the SSM state ``N`` (``d_state``), the Δ
  rank ``J`` (``dt_rank``). Shared: ``expand`` (so that ``F_pad = expand · D_pad`` is the largest F),
  the conv width ``W`` (a causal conv's taps are position-aligned: padding them would shift it), ``V``.

**Why it is exact** — by induction over the forward pass, the padded entries of every activation
and of every gradient are exactly 0 (a sum of exact zeros is an exact zero; only the true entries'
sums see more, zero, terms: float32 reassociation at most), leaf by leaf:

* *Embedding* ``table_VD`` (and an untied ``head.w_DV``): padded ``D`` columns are 0, so the
  residual stream's padded features start at 0, and stay 0 because every residual write
  (``w_o_HKD``, ``w_down_FD``, ``w_out_FD``, ``b_out_D``) has zero padded ``D`` columns. Their
  gradients ``Σ x_d · dy`` read padded features ``x_d = 0`` (or padded ``dy_d = 0``, below): 0.
* *RMSNorm* ``scale_LD`` / ``scale_D`` — the one piece that is not automatic: the mean square must
  divide by the member's *true* ``D``. The scaffold does so (``model_state["pack"]["d_model"]``,
  :func:`jscale.nn.rms_norm`'s ``width``): the padded features are 0, so the sum of squares is the
  true sum and the statistic is the member's own, epsilon included. Padded scale entries are 0, so
  the normed output's padded features are 0 and their gradient ``dy_d · x_d · r`` is 0; the input
  gradient at a padded feature is ``s_d · r · dy_d + x_d · (…)`` = 0. So the backward pass's
  padded ``D`` entries (``dy_d``) are 0 everywhere, and the head's padded columns get no gradient.
* *Attention* ``w_q_DHK``, ``w_k_DGK``, ``w_v_DGK``, ``w_o_HKD`` (+ ``b_q_HK``, ``b_k_GK``,
  ``b_v_GK``): a padded head has zero q (and, in a padded kv group, zero k and v). A padded query
  head in a *true* kv group would attend with uniform weights and read its group's mean value —
  not 0 — and ``w_o``'s gradient ``ctxᵀ · dy`` would not be 0 either: so the attention output is
  multiplied by ``model_state["pack"]["head_mask_H"]`` (1 on true heads — exact — and 0 on padded
  ones), which makes a padded head's context, output and every gradient through it exactly 0.
  (Members that share ``R`` need no mask — padded heads are whole padded kv groups with v = 0 — but
  the mask is applied alike, for one program.) RoPE rotates zeros to zeros; qk-norm normalizes a
  zero head to zero (its ``scale_K`` is over the shared ``K``).
* *SwiGLU* ``w_gate_DF``, ``w_up_DF``, ``w_down_FD``: a padded unit has gate = up = 0 and
  ``silu(0) · 0 = 0``; its ``w_down`` row is 0 and gets ``act · dy = 0``; the gradient back into it
  is ``dy · w_downᵀ = 0``, so ``w_gate``/``w_up`` get 0.
* *Mamba mixer*: a padded channel ``f`` has ``x = z = 0`` (zero ``w_in`` columns and biases), a zero
  conv (``w_conv_WF``, ``b_conv_F`` 0), so ``u = silu(0) = 0``; its scan input ``Δ·B·u`` is 0, so its
  state stays 0 and ``y_f = C·h + skip_f · u = 0`` (``skip_F`` 0), gated ``0 · silu(0) = 0``; its
  ``w_out_FD`` row is 0 and gets ``y_f · dy = 0``, and the gradient back into ``y_f`` is
  ``dy · w_outᵀ = 0``, so every leaf of the channel (``a_log_FN``, ``b_dt_F``, ``w_dt_JF`` column,
  ``w_x_*_FN``/``_FJ`` row, ``w_conv``, ``w_in``) gets 0. (Its Δ is ``softplus(0) = log 2`` and its
  ``A = -exp(0) = -1``: finite, harmless.) A padded state ``n`` has ``B_n = C_n = 0`` (zero
  ``w_x_b_FN``/``w_x_c_FN`` columns): its state stays 0, it adds ``C_n h_n = 0``, and its gradients
  read ``h_n = 0`` or ``C_n = 0``: 0. A padded Δ-rank unit ``j`` has ``Δ_j = 0`` and a zero
  ``w_dt_JF`` row: it adds nothing and both its leaves get 0.
* *Padded layers* (every parameter 0, norm scales included): the norm outputs 0, every part of a
  zero input and zero weights outputs 0 (attention: zero q, k, v → context 0), so the layer is the
  identity; its weight gradients are (input = 0)ᵀ · … or … · (weight = 0) products, and its norm
  scale's gradient reads a zero upstream gradient: all 0. The residual gradient passes through.
* *Optimizer*: AdamW on a zero gradient keeps zero moments and updates by ``0 / (0 + ε) = 0``; the
  decoupled weight decay of a zero entry is 0; global-norm clipping and the logged ``grad_norm``
  sum the squares of the true gradients only (the padded ones are exact zeros).
* *Loss and metrics*: the vocabulary is shared, so the logits are the member's own.

So padded entries are zero at init and stay zero through training, and every true entry computes
the member's own math, up to float32 reassociation of the sums that now see extra zero terms.
(The ``decode`` path — one token at a time — is not packed: unpack a member's parameters first.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jscale import registry
from jscale.config import ConfigError
from jscale.models import lm
from jscale.models.mamba import MambaConfig
from jscale.models.parts.attention import Attention
from jscale.models.parts.mamba_mixer import MambaMixer
from jscale.models.parts.swiglu import SwiGLU
from jscale.models.spec import PACK_KEY
from jscale.models.transformer import TransformerConfig

Array = jax.Array

#: Per packable config class, the fields members may differ in (each padded to the largest); every
#: other field must be equal (the head dim and ``dt_rank`` are compared resolved, as ``k``/``rank``).
PADDED_FIELDS = {TransformerConfig: ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"),
                 MambaConfig: ("d_model", "n_layers", "d_state", "dt_rank")}
#: Sizes packed members must share, by config class: ((resolved attribute, field), ...), and what
#: the error says they must share.
_SHARED = {TransformerConfig: ((("k", "model.head_dim"), ("vocab_size", "model.vocab_size")),
                               "the head dim and the vocabulary"),
           MambaConfig: ((("vocab_size", "model.vocab_size"), ("expand", "model.expand"),
                          ("d_conv", "model.d_conv")),
                         "the vocabulary, model.expand (the padded inner width is expand × the "
                         "padded d_model) and the conv width model.d_conv (its taps are aligned "
                         "to the position)")}


def padded_config(model_cfgs: Sequence[Any]) -> Any:
    """The padded model config of a group of members (the module docstring lists what is padded and
    what must be shared); raises :class:`ConfigError` naming the field when they cannot be packed.
    ``padded_config([cfg]) == cfg``."""
    cfgs = list(model_cfgs)
    if not cfgs:
        raise ConfigError("packing: a packed group needs at least one member")
    cls = type(cfgs[0])
    if cls not in PADDED_FIELDS:
        raise ConfigError(f"model: packing supports {', '.join(c.__name__ for c in PADDED_FIELDS)} "
                          f"members, not {cls.__name__}")
    for c in cfgs[1:]:
        if type(c) is not cls:
            raise ConfigError(f"model: packed members must be of one family ({cls.__name__} vs "
                              f"{type(c).__name__})")
    if cls is TransformerConfig:
        for c in cfgs:
            if c.moe is not None:
                raise ConfigError("model.moe: packing supports dense transformers only (a mixture "
                                  "of experts' widths are not packed yet)")
    shared, shared_what = _SHARED[cls]
    for attr, field in shared:
        values = [getattr(c, attr) for c in cfgs]
        if len(set(values)) > 1:
            a, b = values[0], next(v for v in values if v != values[0])
            raise ConfigError(f"{field}: members differ ({a} vs {b}); packed members must share "
                              f"{shared_what}")
    skip = set(PADDED_FIELDS[cls]) | {"head_dim"}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        values = [getattr(c, f.name) for c in cfgs]
        if any(v != values[0] for v in values):
            b = next(v for v in values if v != values[0])
            raise ConfigError(f"model.{f.name}: members differ ({values[0]!r} vs {b!r}); packed "
                              f"members may differ only in {', '.join(PADDED_FIELDS[cls])}")
    base = cfgs[0]
    D, L = max(c.d_model for c in cfgs), max(c.n_layers for c in cfgs)
    if cls is TransformerConfig:
        G = max(c.n_kv_heads for c in cfgs)
        R = max(c.n_heads // c.n_kv_heads for c in cfgs)
        K, head_dims = base.k, {c.head_dim for c in cfgs}
        head_dim = None if K * G * R == D else K
        if len(head_dims) == 1 and (base.head_dim is not None or head_dim is None):
            head_dim = base.head_dim  # as the members spell it
        return dataclasses.replace(base, d_model=D, n_layers=L, n_kv_heads=G, n_heads=G * R,
                                   d_ff=max(c.d_ff for c in cfgs), head_dim=head_dim)
    J = max(c.rank for c in cfgs)
    auto = all(c.dt_rank == "auto" for c in cfgs)  # then J is the padded width's own auto rank
    return dataclasses.replace(base, d_model=D, n_layers=L, d_state=max(c.d_state for c in cfgs),
                               dt_rank="auto" if auto else J)


# ---------------------------------------------------------------------------------------------------
# where a member's entries sit in the padded leaves


def _sizes(cfg: Any) -> dict[str, Any]:
    """The sizes by shape letter (``L``: ``{stack key: steps}``; ``R``: query heads per kv head)."""
    spec = registry.family_of(cfg).spec(cfg)
    out: dict[str, Any] = {"D": spec.d_model, "V": spec.vocab_size,
                           "L": {st.key: st.n_steps for st in spec.layer_stacks}}
    for st in spec.layer_stacks:
        for sub in st.block:
            p = sub.part
            if isinstance(p, Attention):
                out.update(G=p.n_kv_heads, R=p.n_heads // p.n_kv_heads, H=p.n_heads, K=p.head_dim)
            elif isinstance(p, SwiGLU):
                out.update(F=p.d_ff)
            elif isinstance(p, MambaMixer):
                out.update(F=p.d_inner, N=p.d_state, J=p.dt_rank, W=p.d_conv)
            else:
                raise ConfigError(f"packing knows no part {type(p).__name__} (sub-layer "
                                  f"{sub.name!r})")
    return out


def _axis_index(letter: str, stack: str | None, s: dict[str, Any], sp: dict[str, Any]
                ) -> np.ndarray:
    """The padded positions of a member's entries along one axis (its true block, in order)."""
    if letter == "L":
        return np.arange(s["L"][stack])
    if letter == "H":  # head (g, j) keeps its kv group: g · R_pad + j
        g, j = np.divmod(np.arange(s["H"]), s["R"])
        return g * sp["R"] + j
    if letter not in s:
        raise ConfigError(f"packing: no size for axis {letter!r}")
    if letter in ("K", "V", "W") and s[letter] != sp[letter]:
        raise AssertionError(f"packing: the shared size {letter} differs (a bug in padded_config)")
    return np.arange(s[letter])


@functools.lru_cache(maxsize=256)
def _abstract(cfg: Any) -> Any:
    return jax.eval_shape(lambda k: registry.family_of(cfg).init(k, cfg), jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=256)
def _layout(cfg: Any, cfg_pad: Any) -> tuple[Any, list[tuple[np.ndarray, ...]]]:
    """``(padded abstract tree, per leaf (flat order) the per-axis index arrays)``."""
    true, pad = _abstract(cfg), _abstract(cfg_pad)
    if jax.tree.structure(true) != jax.tree.structure(pad):
        raise ConfigError(f"packing: the member's parameter tree differs from the padded model's "
                          f"({jax.tree.structure(true)} vs {jax.tree.structure(pad)})")
    s, sp = _sizes(cfg), _sizes(cfg_pad)
    stacks = set(s["L"])
    out = []
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(true)[0], jax.tree.leaves(pad),
                            strict=True):
        keys = [str(k.key) for k in path]
        letters = keys[-1].rsplit("_", 1)[-1]
        if not (letters.isupper() and len(letters) == x.ndim):
            raise ConfigError(f"packing reads a leaf's axes from its name's shape letters: "
                              f"{'.'.join(keys)} has shape {x.shape}")
        idx = tuple(_axis_index(c, keys[0] if keys[0] in stacks else None, s, sp)
                    for c in letters)
        if any(len(i) != n for i, n in zip(idx, x.shape, strict=True)) or any(
                i.max(initial=-1) >= n for i, n in zip(idx, y.shape, strict=True)):
            raise AssertionError(f"packing: {'.'.join(keys)} {x.shape} does not fit {y.shape}")
        out.append(idx)
    return pad, out


def _resolved(cfg: Any) -> Any:
    """``cfg`` with its derived sizes spelled out (the head dim, the Δ rank)."""
    if isinstance(cfg, TransformerConfig):
        return dataclasses.replace(cfg, head_dim=cfg.k)
    return dataclasses.replace(cfg, dt_rank=cfg.rank)


def _check_fits(cfg: Any, cfg_pad: Any) -> None:
    if _resolved(padded_config([cfg, cfg_pad])) != _resolved(cfg_pad):
        raise ConfigError(f"packing: {registry.family_of(cfg).describe(cfg)} does not fit the "
                          f"padded model {registry.family_of(cfg_pad).describe(cfg_pad)}")


@functools.partial(jax.jit, static_argnames=("cfg", "cfg_pad"))
def pack_params(params: Any, cfg: Any, cfg_pad: Any) -> Any:
    """One member's parameters (``cfg``'s tree) zero-padded into ``cfg_pad``'s shapes: its entries
    at the leading positions of every axis (heads at ``g · R_pad + j``), zeros elsewhere."""
    _check_fits(cfg, cfg_pad)
    pad, index = _layout(cfg, cfg_pad)
    leaves, treedef = jax.tree.flatten(params)
    out = [jnp.zeros(p.shape, p.dtype).at[np.ix_(*idx)].set(x.astype(p.dtype))
           for x, p, idx in zip(leaves, jax.tree.leaves(pad), index, strict=True)]
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("cfg", "cfg_pad"))
def unpack_params(params_pad: Any, cfg: Any, cfg_pad: Any) -> Any:
    """A member's own parameters (``cfg``'s tree) out of its packed ones: :func:`pack_params`'
    inverse."""
    _check_fits(cfg, cfg_pad)
    _, index = _layout(cfg, cfg_pad)
    leaves, treedef = jax.tree.flatten(params_pad)
    return jax.tree.unflatten(treedef, [x[np.ix_(*idx)] for x, idx in
                                        zip(leaves, index, strict=True)])


def padding_mask(cfg: Any, cfg_pad: Any) -> Any:
    """``cfg_pad``'s parameter tree of numpy bools: ``True`` at the entries that are padding for a
    member of config ``cfg`` (exactly zero through training)."""
    _check_fits(cfg, cfg_pad)
    pad, index = _layout(cfg, cfg_pad)
    leaves, treedef = jax.tree.flatten(pad)
    out = []
    for p, idx in zip(leaves, index, strict=True):
        m = np.ones(p.shape, bool)
        m[np.ix_(*idx)] = False
        out.append(m)
    return jax.tree.unflatten(treedef, out)


def pack_state(cfg: Any, cfg_pad: Any) -> dict[str, Any]:
    """A member's model state in the padded program: ``cfg_pad``'s own model state plus
    ``"pack"``, the member's true sizes as data — ``d_model`` (float32, the residual norms'
    width) and, with attention, ``head_mask_H`` (float32 ``[H_pad]``: 1 on the member's heads).
    Stack the members' states on a leading R axis for a vmapped group."""
    _check_fits(cfg, cfg_pad)
    s, sp = _sizes(cfg), _sizes(cfg_pad)
    pack = {"d_model": jnp.asarray(s["D"], jnp.float32)}
    if "H" in sp:
        mask = np.zeros(sp["H"], np.float32)
        mask[_axis_index("H", None, s, sp)] = 1.0
        pack["head_mask_H"] = jnp.asarray(mask)
    return {**lm.init_model_state(registry.family_of(cfg_pad).spec(cfg_pad)), PACK_KEY: pack}


def init_packed(key: Array, cfg: Any, cfg_pad: Any) -> Any:
    """A member's initial parameters in the padded shape: its own init (``models.init(key, cfg)``:
    the true fan-in stds and the values an unpadded run of this key draws), packed."""
    from jscale import models  # the façade (one jitted init per config)
    return pack_params(models.init(key, cfg), cfg, cfg_pad)


def padding_waste(model_cfgs: Sequence[Any], seq_len: int) -> float:
    """Padded over true training compute of a group: ``R · flops(cfg_pad) / Σ flops(cfg)`` (model
    FLOPs per token, :func:`jscale.models.flops_per_token`); 1.0 when nothing is padded."""
    from jscale import models
    cfg_pad = padded_config(model_cfgs)
    padded = len(model_cfgs) * models.flops_per_token(cfg_pad, seq_len)["training"]
    return padded / math.fsum(models.flops_per_token(c, seq_len)["training"] for c in model_cfgs)
