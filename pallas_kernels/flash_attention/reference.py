"""Pure-jnp attention: the oracle the Pallas kernels are tested against and the ``impl="xla"`` path.

Semantics shared by every implementation in this folder (dims glossary in :mod:`jscale.nn`):

* ``q_BTHK`` queries, ``k_BSGK`` / ``v_BSGK`` keys and values; ``H`` must be a multiple of ``G``
  (grouped-query attention: query head ``h`` reads kv head ``h // (H // G)``).
* ``causal=True``: query ``t`` attends to keys ``s <= t`` (top-left aligned when ``T != S``, as in
  ``jax.nn.dot_product_attention(is_causal=True)``).
* ``segment_ids``: ``None``, one ``[B, T]`` int array (self-attention, ``T == S``) or a pair
  ``(q_segment_ids_BT, kv_segment_ids_BS)``; query ``t`` attends to key ``s`` only if the ids match.
* A query that may attend to no key at all gets a zero output (and zero gradients).
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
                   kv_seg_BS: Array | None) -> Array | None:
    """``[B or 1, T, S]`` boolean mask (True = may attend), or None when nothing is masked."""
    mask_BTS = None
    if causal:
        mask_BTS = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None]
    if q_seg_BT is not None:
        seg_BTS = q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
        mask_BTS = seg_BTS if mask_BTS is None else mask_BTS & seg_BTS
    return mask_BTS


def attention_reference(q_BTHK: Array, k_BSGK: Array, v_BSGK: Array, *, causal: bool = True,
                        segment_ids=None, scale: float | None = None) -> Array:
    """Softmax attention written out in full (a ``[B, H, T, S]`` score matrix), in float32."""
    B, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    scale = K**-0.5 if scale is None else scale
    q_seg_BT, kv_seg_BS = split_segment_ids(segment_ids, T, S)
    q_BTGRK = q_BTHK.astype(jnp.float32).reshape(B, T, G, H // G, K)
    scores_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST) * scale
    mask_BTS = attention_mask(T, S, causal=causal, q_seg_BT=q_seg_BT, kv_seg_BS=kv_seg_BS)
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
