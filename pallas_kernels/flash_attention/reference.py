"""Pure-jnp attention: the oracle the Pallas kernels are tested against and the ``impl="xla"`` path.

Semantics shared by every implementation in this folder (dims glossary in :mod:`jscale.nn`):

* ``q_BTHK`` queries, ``k_BSGK`` / ``v_BSGK`` keys and values; ``H`` must be a multiple of ``G``
  (grouped-query attention: query head ``h`` reads kv head ``h // (H // G)``).
* ``causal=True``: query ``t`` attends to keys ``s <= t`` (top-left aligned when ``T != S``, as in
  ``jax.nn.dot_product_attention(is_causal=True)``).
* ``segment_ids``: ``None``, one ``[B, T]`` int array (self-attention, ``T == S``) or a pair
  ``(q_segment_ids_BT, kv_segment_ids_BS)``; query ``t`` attends to key ``s`` only if the ids match.
* ``prefix_k`` / ``prefix_v`` (optional, together): ``[B, S_p, G, K]`` prefix keys/values
  (ParScale's learned per-layer prefixes, arXiv 2505.10475) placed before the real keys. Every
  query attends to all ``S_p`` of them regardless of ``causal`` and ``segment_ids``; the softmax is
  over the prefix and the query's usual keys together. Causal and segment tests apply to the real
  keys only, at their own positions ``0 .. S-1`` (the prefix does not shift them). No RoPE or other
  position transform is applied here (the caller's business).
* A query that may attend to no key at all gets a zero output (and zero gradients); with a prefix
  there is no such query.
* Scores, softmax and the weighted sum run in float32; the output has ``q``'s dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def split_segment_ids(segment_ids, t: int, s: int) -> tuple[Array | None, Array | None]:
    """Normalize ``segment_ids`` (None, ``[B, T]`` array or a pair) to ``(q_seg_BT, kv_seg_BS)``."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        q_seg_BT, kv_seg_BS = segment_ids
    else:
        if t != s:
            raise ValueError(f"one segment_ids array needs T == S (got T={t}, S={s}); pass a pair "
                             "(q_segment_ids_BT, kv_segment_ids_BS)")
        q_seg_BT = kv_seg_BS = segment_ids
    if q_seg_BT.shape[-1] != t or kv_seg_BS.shape[-1] != s:
        raise ValueError(f"segment ids of shapes {q_seg_BT.shape}, {kv_seg_BS.shape} do not match "
                         f"T={t}, S={s}")
    return q_seg_BT.astype(jnp.int32), kv_seg_BS.astype(jnp.int32)


def attention_mask(t: int, s: int, *, causal: bool, q_seg_BT: Array | None,
                   kv_seg_BS: Array | None, n_prefix: int = 0) -> Array | None:
    """``[B or 1, T, n_prefix + S]`` boolean mask (True = may attend), or None when nothing is
    masked. The first ``n_prefix`` columns (prefix keys) are always True; the causal and segment
    tests apply to the ``S`` real keys after them."""
    mask_BTS = None
    if causal:
        mask_BTS = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None]
    if q_seg_BT is not None:
        seg_BTS = q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
        mask_BTS = seg_BTS if mask_BTS is None else mask_BTS & seg_BTS
    if mask_BTS is not None and n_prefix:
        prefix_BTS = jnp.ones((mask_BTS.shape[0], t, n_prefix), bool)
        mask_BTS = jnp.concatenate([prefix_BTS, mask_BTS], axis=-1)
    return mask_BTS


def check_prefix(prefix_k, prefix_v, k_BSGK: Array) -> int:
    """Validate ``prefix_k`` / ``prefix_v`` against the keys ``k_BSGK``; return ``S_p`` (0 if none).

    Raises ``ValueError`` naming the argument when only one is given, or when a shape (rank, B, G,
    K, ``S_p >= 1``, the two alike) or the dtype does not fit ``k``.
    """
    if prefix_k is None and prefix_v is None:
        return 0
    if prefix_k is None or prefix_v is None:
        given, missing = ("prefix_k", "prefix_v") if prefix_v is None else ("prefix_v", "prefix_k")
        raise ValueError(f"{given} was given without {missing}: pass both or neither")
    B, _, G, K = k_BSGK.shape
    for name, x in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if x.ndim != 4 or x.shape[0] != B or x.shape[2] != G or x.shape[3] != K or x.shape[1] < 1:
            raise ValueError(f"{name} of shape {tuple(x.shape)} must be [B, S_p, G, K] = "
                             f"[{B}, S_p >= 1, {G}, {K}] to fit k {tuple(k_BSGK.shape)}")
        if x.dtype != k_BSGK.dtype:
            raise ValueError(f"{name} dtype {x.dtype} differs from k's {k_BSGK.dtype}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v of shape {tuple(prefix_v.shape)} differs from prefix_k's "
                         f"{tuple(prefix_k.shape)}")
    return prefix_k.shape[1]


def attention_reference(q_BTHK: Array, k_BSGK: Array, v_BSGK: Array, *, causal: bool = True,
                        segment_ids=None, prefix_k: Array | None = None,
                        prefix_v: Array | None = None, scale: float | None = None) -> Array:
    """Softmax attention written out in full (a ``[B, H, T, S_p + S]`` score matrix), in float32.

    ``prefix_k`` / ``prefix_v``: optional ``[B, S_p, G, K]`` keys/values every query attends to
    (module docstring); the other arguments as in ``ops.flash_attention``.
    """
    B, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    scale = K**-0.5 if scale is None else scale
    q_seg_BT, kv_seg_BS = split_segment_ids(segment_ids, T, S)
    n_prefix = check_prefix(prefix_k, prefix_v, k_BSGK)
    if n_prefix:
        k_BSGK = jnp.concatenate([prefix_k, k_BSGK], axis=1)
        v_BSGK = jnp.concatenate([prefix_v, v_BSGK], axis=1)
    q_BTGRK = q_BTHK.astype(jnp.float32).reshape(B, T, G, H // G, K)
    scores_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST) * scale
    mask_BTS = attention_mask(T, S, causal=causal, q_seg_BT=q_seg_BT, kv_seg_BS=kv_seg_BS,
                              n_prefix=n_prefix)
    if mask_BTS is not None:
        mask_B11TS = mask_BTS[:, None, None]
        scores_BGRTS = jnp.where(mask_B11TS, scores_BGRTS, -jnp.inf)
        # Rows with no visible key: softmax over zeros (finite), then zeroed below.
        any_B11T1 = mask_B11TS.any(-1, keepdims=True)
        scores_BGRTS = jnp.where(any_B11T1, scores_BGRTS, 0.0)
    weights_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1)
    if mask_BTS is not None:
        weights_BGRTS = jnp.where(any_B11T1, weights_BGRTS, 0.0)
    out_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", weights_BGRTS, v_BSGK.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
    return out_BTGRK.reshape(B, T, H, K).astype(q_BTHK.dtype)
