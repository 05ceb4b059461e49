"""Stateless neural-network primitives over plain arrays.

Every component is a pair ``init_x(key, ...) -> params`` / ``x(params, inputs, ...) -> out``; params are
nested ``dict[str, Array]`` whose leaf names end in their shape letters.

Dims glossary (used in every variable and leaf name in jscale):

====  ============================================  ====  ==========================================
B     batch                                         T     sequence (queries)
S     key/value sequence                            D     model width
H     query heads                                   G     key/value heads (GQA groups)
K     head dim                                      F     FFN width
V     vocabulary                                    E     experts
N     SSM state                                     P     parallel streams (ParScale)
L     stacked layers                                R     runs in a vmapped sweep
J     Mamba's Δ (dt) rank                           W     Mamba's causal conv width
====  ============================================  ====  ==========================================

A stacked leaf carries ``L`` in its name (``w_q_LDHK``); inside the layer scan one layer's slice drops
it (``w_q_DHK``): :func:`stack_name` / :func:`unstack_name` convert, :func:`unstack_names` renames a
sliced tree. (The scaling-law optimiser in :mod:`jscale.laws` uses letters of its own.)
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def truncated_normal(key: Array, shape: tuple[int, ...], std: float, dtype) -> Array:
    """Normal(0, std²) truncated at ±2 std (rescaled so the std is ``std``), the usual LM init."""
    # jax.random.truncated_normal on [-2, 2] has std ~0.8796; rescale to the requested std.
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * (std / 0.87962566)
            ).astype(dtype)


def rms_norm(x: Array, scale: Array, eps: float, width: Array | None = None) -> Array:
    """RMSNorm over the last axis, computed in float32; returns ``x``'s dtype.

    ``width`` (optional, a float32 scalar, may be traced): the number of *true* features — the mean
    square is the sum of squares divided by it, not by the axis length. For a model zero-padded past
    its true width (:mod:`jscale.models.packing`): the padded features are zero, so the sum is the
    true sum and the statistic is the unpadded model's, epsilon included. ``None``: the mean."""
    x32 = x.astype(jnp.float32)
    if width is None:
        ms = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    else:
        ms = jnp.sum(x32 * x32, axis=-1, keepdims=True) / jnp.asarray(width, jnp.float32)
    y = x32 * jax.lax.rsqrt(ms + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def embed(table_VD: Array, tokens_BT: Array, dtype) -> Array:
    """Look up token embeddings: ``[V, D]`` table, ``[B, T]`` ids -> ``[B, T, D]``."""
    return jnp.take(table_VD, tokens_BT, axis=0).astype(dtype)


def rope_sin_cos(positions_BT: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """Rotary-embedding angles for ``positions_BT``: ``sin, cos`` of shape ``[B, T, K/2]`` (float32)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BTk = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles_BTk), jnp.cos(angles_BTk)


def apply_rope(x_BTHK: Array, sin_BTk: Array, cos_BTk: Array) -> Array:
    """Rotate pairs ``(x[..., :K/2], x[..., K/2:])`` (the GPT-NeoX / Llama "half" layout)."""
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin_BTk[:, :, None, :], cos_BTk[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)


def swiglu(x_BTD: Array, w_gate_DF: Array, w_up_DF: Array, w_down_FD: Array) -> Array:
    """SwiGLU feed-forward: ``(silu(x W_gate) * (x W_up)) W_down``."""
    dtype = x_BTD.dtype
    gate_BTF = jnp.einsum("btd,df->btf", x_BTD, w_gate_DF.astype(dtype))
    up_BTF = jnp.einsum("btd,df->btf", x_BTD, w_up_DF.astype(dtype))
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_BTF) * up_BTF, w_down_FD.astype(dtype))


def segment_mask(segment_ids_BT: Array, segment_ids_BS: Array | None = None) -> Array:
    """``[B, 1, T, S]`` boolean mask: query t may attend key s iff they share a segment id."""
    if segment_ids_BS is None:
        segment_ids_BS = segment_ids_BT
    return (segment_ids_BT[:, :, None] == segment_ids_BS[:, None, :])[:, None]


_SUFFIX = re.compile(r"^(.*?)(?:_([A-Z]+))?$")


def stack_name(name: str) -> str:
    """One layer's leaf name → the stacked leaf's: ``"w_q_DHK"`` → ``"w_q_LDHK"``, ``"count"`` →
    ``"count_L"``."""
    stem, dims = _SUFFIX.match(name).groups()
    return f"{stem}_L{dims or ''}"


def unstack_name(name: str) -> str:
    """A stacked leaf name → one layer's: ``"w_q_LDHK"`` → ``"w_q_DHK"``, ``"count_L"`` →
    ``"count"``; a name without a leading ``L`` in its suffix is returned unchanged."""
    stem, dims = _SUFFIX.match(name).groups()
    if not dims or not dims.startswith("L"):
        return name
    return f"{stem}_{dims[1:]}" if len(dims) > 1 else stem


def unstack_names(tree: Any) -> Any:
    """``tree`` (nested dicts) with every leaf key renamed by :func:`unstack_name`: how a one-layer
    slice of the ``L``-stacked parameters is named inside the layer scan."""
    if not isinstance(tree, dict):
        return tree
    return {(k if isinstance(v, dict) else unstack_name(k)): unstack_names(v) for k, v in tree.items()}
