"""Grouped-query attention with RoPE and optional qk-norm, as a block part.

Leaves (one layer): ``w_q_DHK``, ``w_k_DGK``, ``w_v_DGK``, ``w_o_HKD``; with ``qkv_bias`` (Qwen2) the
projection biases ``b_q_HK``, ``b_k_GK``, ``b_v_GK`` (zero-initialised); with qk-norm
``q_norm.scale_K`` / ``k_norm.scale_K``. Causal self-attention over the block's tokens; with
``segment_ids_BT`` a token attends only to its own packed document.

A **prefix KV** may arrive as this layer's ``layer_input``: extra keys/values prepended to the real
ones, with no RoPE, that every query sees regardless of causality and segment ids (ParScale's
per-stream prefixes, :mod:`jscale.models.parscale`). Either per row, ``{"prefix_k_BSGK",
"prefix_v_BSGK"}`` (``[B, S_prefix, G, K]``), or per stream, ``{"prefix_k_PGSK", "prefix_v_PGSK"}``
(``[P, G, S_prefix, K]``, the official layout), for a batch whose rows are ``P`` streams,
stream-major (row ``p·(B/P) + b`` is stream ``p``). Both attention paths take a prefix.

**Decode** (:mod:`jscale.models.decode`): a KV cache per layer, ``k_BSGK`` / ``v_BSGK`` in the
compute dtype with ``S = n_prefix + max_len`` slots, and ``n_prefix`` (int32). ``init_cache`` writes
the layer input's prefix (either form above, as rows) into the first ``n_prefix`` slots, unrotated;
the real token at position ``t`` lives at slot ``n_prefix + t`` with RoPE at position ``t``. A step
writes its token's key/value, then its query attends to every prefix slot and the real slots up to
its own: the full pass's keys, in the same order. Past ``max_len`` the write lands on the last slot
(``dynamic_update_slice`` clamps): :mod:`jscale.models.decode` makes such a step's output NaN.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jscale import nn
from jscale.models.parts.base import Const, Context, Leaf, Normal, Part
from jscale.sharding import constrain, per_shard

Array = jax.Array


def attention(q_BTHK: Array, k_BSGK: Array, v_BSGK: Array, *, segment_ids_BT: Array | None,
              impl: str, prefix_k_BSGK: Array | None = None,
              prefix_v_BSGK: Array | None = None) -> Array:
    """Causal grouped-query attention; the one place an attention implementation is chosen.

    ``impl="xla"`` uses ``jax.nn.dot_product_attention`` (GQA without repeating K/V per query head);
    ``impl="pallas"`` the flash-attention kernel. With ``segment_ids_BT`` a token attends only to
    earlier tokens of its own segment (packed documents). ``prefix_k_BSGK`` / ``prefix_v_BSGK``
    (optional, together): keys/values every query attends to, before its causal window.
    """
    prefixed = prefix_k_BSGK is not None
    if impl == "pallas":
        from pallas_kernels.flash_attention import flash_attention

        def kernel(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, *prefix_BSGK):
            kw = dict(zip(("prefix_k", "prefix_v"), prefix_BSGK, strict=False))  # none or both
            return flash_attention(q_BTHK, k_BSGK, v_BSGK, causal=True,
                                   segment_ids=segment_ids_BT, impl="pallas", **kw)
        # On a mesh the kernel runs on each device's batch rows and heads (kv heads split alike).
        prefix = (prefix_k_BSGK, prefix_v_BSGK) if prefixed else ()
        return per_shard(kernel, ("BTHK", "BSGK", "BSGK", "BT") + ("BSGK",) * len(prefix),
                         "BTHK")(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, *prefix)
    if impl != "xla":
        raise ValueError(f"attention impl {impl!r} is not available")
    if not prefixed:
        mask = None if segment_ids_BT is None else nn.segment_mask(segment_ids_BT)
        return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask, is_causal=True,
                                            implementation="xla")
    B, T = q_BTHK.shape[:2]
    S = prefix_k_BSGK.shape[1]
    seen_BTT = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    if segment_ids_BT is not None:
        seen_BTT = seen_BTT & nn.segment_mask(segment_ids_BT)[:, 0]
    mask = jnp.concatenate([jnp.ones((B, T, S), bool), seen_BTT], axis=-1)[:, None]
    k_BSGK = jnp.concatenate([prefix_k_BSGK.astype(k_BSGK.dtype), k_BSGK], axis=1)
    v_BSGK = jnp.concatenate([prefix_v_BSGK.astype(v_BSGK.dtype), v_BSGK], axis=1)
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask, implementation="xla")


def prefix_rows(prefix: dict[str, Array], n_rows: int) -> tuple[Array | None, Array | None]:
    """A layer input's prefix keys/values as rows ``[B, S, G, K]`` (``(None, None)`` without one):
    per-row prefixes as they are; per-stream ``[P, G, S, K]`` ones repeated over each stream's
    ``n_rows / P`` rows (stream-major)."""
    if "prefix_k_PGSK" in prefix:
        k_PGSK, v_PGSK = prefix["prefix_k_PGSK"], prefix["prefix_v_PGSK"]
        P = k_PGSK.shape[0]
        if n_rows % P:
            raise ValueError(f"{n_rows} batch rows are not {P} streams of equal size")

        def rows(x_PGSK):
            x_PSGK = x_PGSK.transpose(0, 2, 1, 3)
            return constrain(jnp.repeat(x_PSGK, n_rows // P, axis=0), "BSGK")
        return rows(k_PGSK), rows(v_PGSK)
    return prefix.get("prefix_k_BSGK"), prefix.get("prefix_v_BSGK")


@dataclasses.dataclass(frozen=True)
class Attention(Part):
    """GQA + RoPE (+ qk-norm) part. ``out_div`` further divides the output projection's init std
    (the family's residual-depth rescale); ``init_scale`` multiplies every random leaf's std."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    norm_eps: float
    qk_norm: bool
    impl: str
    qkv_bias: bool = False
    init_scale: float = 1.0
    out_div: float = 1.0

    def leaves(self) -> list[Leaf]:
        D, H, G, K, s = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.init_scale
        out = [Leaf(("w_q_DHK",), (D, H, K), Normal(s / math.sqrt(D))),
               Leaf(("w_k_DGK",), (D, G, K), Normal(s / math.sqrt(D))),
               Leaf(("w_v_DGK",), (D, G, K), Normal(s / math.sqrt(D))),
               Leaf(("w_o_HKD",), (H, K, D), Normal(s / self.out_div / math.sqrt(H * K)))]
        if self.qkv_bias:
            out += [Leaf(("b_q_HK",), (H, K), Const(0.0)), Leaf(("b_k_GK",), (G, K), Const(0.0)),
                    Leaf(("b_v_GK",), (G, K), Const(0.0))]
        if self.qk_norm:
            out += [Leaf(("q_norm", "scale_K"), (K,), Const(1.0)),
                    Leaf(("k_norm", "scale_K"), (K,), Const(1.0))]
        return out

    def prepare(self, ctx: Context) -> tuple[Array, Array]:
        return nn.rope_sin_cos(ctx.positions_BT, self.head_dim, self.rope_theta)

    def apply(self, p: dict[str, Any], h_BTD: Array, ctx: Context, *, prepared: Any = None,
              state: Any = None, layer_input: Any = None) -> tuple[Array, dict, Any]:
        dt = h_BTD.dtype
        q_BTHK, k_BTGK, v_BTGK = self._qkv(p, h_BTD, *prepared)
        prefix_k_BSGK, prefix_v_BSGK = prefix_rows(layer_input or {}, h_BTD.shape[0])
        ctx_BTHK = attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT=ctx.segment_ids_BT,
                             impl=self.impl, prefix_k_BSGK=prefix_k_BSGK,
                             prefix_v_BSGK=prefix_v_BSGK)
        if ctx.pack is not None and "head_mask_H" in ctx.pack:
            # A packed member's padded query heads (jscale.models.packing): their context is the
            # mean of their group's values, not 0, when the group is a true one; masked, it and its
            # gradients are exactly 0.
            ctx_BTHK = ctx_BTHK * ctx.pack["head_mask_H"].astype(ctx_BTHK.dtype)[:, None]
        ctx_BTHK = checkpoint_name(ctx_BTHK, "attn_context")
        return jnp.einsum("bthk,hkd->btd", ctx_BTHK, p["w_o_HKD"].astype(dt)), {}, {}

    def _qkv(self, p: dict[str, Any], h_BTD: Array, sin_BTk: Array,
             cos_BTk: Array) -> tuple[Array, Array, Array]:
        """Queries, keys (both RoPE'd) and values of ``h_BTD``."""
        dt = h_BTD.dtype
        q_BTHK = jnp.einsum("btd,dhk->bthk", h_BTD, p["w_q_DHK"].astype(dt))
        k_BTGK = jnp.einsum("btd,dgk->btgk", h_BTD, p["w_k_DGK"].astype(dt))
        v_BTGK = jnp.einsum("btd,dgk->btgk", h_BTD, p["w_v_DGK"].astype(dt))
        if self.qkv_bias:
            q_BTHK = q_BTHK + p["b_q_HK"].astype(dt)
            k_BTGK = k_BTGK + p["b_k_GK"].astype(dt)
            v_BTGK = v_BTGK + p["b_v_GK"].astype(dt)
        if "q_norm" in p:
            q_BTHK = nn.rms_norm(q_BTHK, p["q_norm"]["scale_K"], self.norm_eps)
            k_BTGK = nn.rms_norm(k_BTGK, p["k_norm"]["scale_K"], self.norm_eps)
        q_BTHK = constrain(nn.apply_rope(q_BTHK, sin_BTk, cos_BTk), "BTHK")
        k_BTGK = constrain(nn.apply_rope(k_BTGK, sin_BTk, cos_BTk), "BTGK")
        v_BTGK = constrain(v_BTGK, "BTGK")
        return q_BTHK, k_BTGK, v_BTGK

    def init_cache(self, batch_size: int, max_len: int, dtype: Any, *,
                   layer_input: Any = None) -> dict[str, Array]:
        """One layer's KV cache (see the module docstring, **Decode**): ``k_BSGK`` / ``v_BSGK`` with
        ``S = n_prefix + max_len`` slots, the layer input's prefix (if any) in the first
        ``n_prefix``, and ``n_prefix`` (int32)."""
        G, K = self.n_kv_heads, self.head_dim
        prefix_k_BSGK, prefix_v_BSGK = prefix_rows(layer_input or {}, batch_size)
        n_prefix = 0 if prefix_k_BSGK is None else prefix_k_BSGK.shape[1]
        out = {}
        for name, prefix_BSGK in (("k_BSGK", prefix_k_BSGK), ("v_BSGK", prefix_v_BSGK)):
            x_BSGK = jnp.zeros((batch_size, n_prefix + max_len, G, K), dtype)
            if n_prefix:
                x_BSGK = x_BSGK.at[:, :n_prefix].set(prefix_BSGK.astype(dtype))
            out[name] = constrain(x_BSGK, "BSGK")
        out["n_prefix"] = jnp.asarray(n_prefix, jnp.int32)
        return out

    def decode(self, p: dict[str, Any], h_BD: Array, cache: dict[str, Array], pos: Array, *,
               prepared: Any = None, state: Any = None) -> tuple[Array, dict[str, Array]]:
        """The token at position ``pos``: its key/value written to slot ``n_prefix + pos``, its query
        against the prefix slots and the filled slots up to its own (``impl`` "xla" whatever
        ``self.impl``: one query per row)."""
        dt = h_BD.dtype
        q_BTHK, k_BTGK, v_BTGK = self._qkv(p, h_BD[:, None], *prepared)
        slot = cache["n_prefix"] + pos
        k_BSGK = jax.lax.dynamic_update_slice_in_dim(
            cache["k_BSGK"], k_BTGK.astype(cache["k_BSGK"].dtype), slot, axis=1)
        v_BSGK = jax.lax.dynamic_update_slice_in_dim(
            cache["v_BSGK"], v_BTGK.astype(cache["v_BSGK"].dtype), slot, axis=1)
        k_BSGK, v_BSGK = constrain(k_BSGK, "BSGK"), constrain(v_BSGK, "BSGK")
        seen_S = jnp.arange(k_BSGK.shape[1]) <= slot
        ctx_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BSGK.astype(dt), v_BSGK.astype(dt),
                                                mask=seen_S[None, None, None],
                                                implementation="xla")
        y_BTD = jnp.einsum("bthk,hkd->btd", ctx_BTHK, p["w_o_HKD"].astype(dt))
        return y_BTD[:, 0], {**cache, "k_BSGK": k_BSGK, "v_BSGK": v_BSGK}

    def count(self) -> int:
        D, H, G, K = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        return (D * H * K + 2 * D * G * K + H * K * D + (2 * K if self.qk_norm else 0)
                + ((H + 2 * G) * K if self.qkv_bias else 0))

    def flops(self, seq_len: int, *, causal: bool = False) -> float:
        """Q/K/V/O projections plus the two T×S matmuls (``4·S·H·K`` per token), counted in full
        (every query against all ``seq_len`` keys) unless ``causal`` (the causal half)."""
        D, H, G, K = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        proj = 2 * (D * H * K + 2 * D * G * K + H * K * D)
        return proj + 4 * seq_len * H * K * (0.5 if causal else 1.0)
