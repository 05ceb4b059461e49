"""``flash_attention``: the public op — impl switch, block defaults, padding, layout, custom_vjp.

Semantics (causal alignment, segment ids, GQA, prefix keys/values, empty rows) are those of
:func:`pallas_kernels.flash_attention.reference.attention_reference`; the kernels are described in
:mod:`pallas_kernels.flash_attention.kernel`.

Prefix keys/values (``prefix_k`` / ``prefix_v``, ``[B, S_p, G, K]``; ParScale, arXiv 2505.10475):
every query attends to all ``S_p`` of them, whatever ``causal`` and ``segment_ids`` say, and the
softmax runs over them and the query's usual keys together. The kernel path concatenates them in
front of the real keys, padded to a multiple of the key tiles (``Spec.prefix_pad``; the padding is
masked), so the real keys stay tile-aligned; the kernels' mask treats the ``S_p`` prefix columns
as always visible and tests the real ones at their own positions. Their gradients are those of the
concatenated columns, sliced back out (autodiff of the concatenation, outside the ``custom_vjp``).

``impl="auto"`` follows the policy of every kernel here (:mod:`pallas_kernels._policy`): the XLA
path (the reference) until the kernel's compiled tests have passed on the platform, recorded in
``pallas_kernels._policy.VALIDATED["flash_attention"]`` — empty today (the kernels have run in
interpret mode and lowered for "cuda" (Triton) and "tpu", never compiled on either), so ``auto``
is XLA everywhere. ``impl="pallas"`` always runs the kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import _policy
from pallas_kernels.flash_attention import kernel
from pallas_kernels.flash_attention.reference import (
    attention_reference,
    check_prefix,
    split_segment_ids,
)

Array = jax.Array
IMPLS = ("auto", "pallas", "xla")
PLATFORMS = ("gpu", "tpu")

#: Default tiles ``(block_q, block_k)`` of the forward and of both backward kernels, by where the
#: kernel runs. Starting points, not tuned (no GPU or TPU was at hand): GPU — FlashAttention-2-style
#: Triton tiles (128×64 forward; 64×64 backward, where the dk/dv and recomputed p/ds tiles share
#: registers); TPU — 512-wide tiles keep the MXU busy and amortize the fixed cost of a grid step,
#: halved in the backward for VMEM; CPU (interpret mode) — large tiles, fewer interpreted steps.
DEFAULT_BLOCKS: dict[str, dict[str, tuple[int, int]]] = {
    "gpu": {"fwd": (128, 64), "bwd": (64, 64)},
    "tpu": {"fwd": (512, 512), "bwd": (256, 256)},
    "cpu": {"fwd": (128, 128), "bwd": (128, 128)},
}


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """``"pallas"`` or ``"xla"`` for ``impl`` on ``platform`` (default: the default backend)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return _policy.resolve("flash_attention", impl, platform)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _fit_block(block: int, length: int, *, variant: str, interpret: bool, axis: str) -> int:
    """Shrink ``block`` for short sequences and check it against the target's tiling rules."""
    if interpret:
        align = 8
        fitted = min(block, _round_up(length, align))
        ok = block % align == 0
        rule = "a multiple of 8"
    elif variant == "gpu":  # Triton: power-of-two tiles, at least 16 for tensor-core dots
        fitted = min(block, max(16, _next_pow2(length)))
        ok = block >= 16 and block == _next_pow2(block)
        rule = "a power of two >= 16 (Triton)"
    else:  # Mosaic TPU: both tile dims are lane dims somewhere (scores, p^T, segment ids)
        fitted = min(block, _round_up(length, 128))
        ok = block % 128 == 0
        rule = "a multiple of 128 (Mosaic TPU)"
    if not ok:
        raise ValueError(f"block_{axis}={block} must be {rule}")
    return fitted


def make_spec(q_shape, k_shape, *, causal: bool, scale: float, segments: bool, variant: str,
              interpret: bool, block_q: int | None, block_k: int | None,
              n_prefix: int = 0) -> kernel.Spec:
    """The static kernel description: tiles fitted to the lengths, padded lengths, launch params.
    ``n_prefix``: prefix keys in front of the ``k_shape[1]`` real ones (0: none), padded to a
    multiple of both key tiles."""
    _, T, H, K = q_shape
    S, G = k_shape[1], k_shape[2]
    where = "cpu" if interpret else variant
    fitted = {}
    for phase in ("fwd", "bwd"):
        dq, dk = DEFAULT_BLOCKS[where][phase]
        fitted[phase] = (
            _fit_block(block_q or dq, T, variant=variant, interpret=interpret, axis="q"),
            _fit_block(block_k or dk, S, variant=variant, interpret=interpret, axis="k"))
    (bq, bk), (bq_b, bk_b) = fitted["fwd"], fitted["bwd"]
    prefix_pad = _round_up(n_prefix, math.lcm(bk, bk_b)) if n_prefix else 0
    return kernel.Spec(
        variant=variant, causal=causal, scale=float(scale), t=T, s=S,
        t_pad=_round_up(T, math.lcm(bq, bq_b)), s_pad=_round_up(S, math.lcm(bk, bk_b)),
        rep=H // G, block_q=bq, block_k=bk, block_q_bwd=bq_b, block_k_bwd=bk_b,
        segments=segments, interpret=interpret, n_prefix=n_prefix, prefix_pad=prefix_pad,
        num_warps=4 if K <= 64 else 8, num_stages=2)


# -------------------------------------------------------------------------------------------------
# custom_vjp over kernel-layout, padded arrays


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: kernel.Spec, q, k, v, q_seg, kv_seg):
    return kernel.forward(q, k, v, q_seg, kv_seg, spec)[0]


def _flash_fwd(spec: kernel.Spec, q, k, v, q_seg, kv_seg):
    out, lse = kernel.forward(q, k, v, q_seg, kv_seg, spec)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(spec: kernel.Spec, residuals, do):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if spec.variant == "gpu":  # [B, T, H] -> [B, H, T, 1]
        delta = jnp.swapaxes(delta, 1, 2)[..., None]
    else:  # [B, H, T] -> lane-replicated [B, H, T, 128]
        delta = jnp.broadcast_to(delta[..., None], lse.shape)
    dq, dk, dv = kernel.backward(q, k, v, q_seg, kv_seg, lse, delta, do.astype(q.dtype), spec)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# -------------------------------------------------------------------------------------------------
# the public op


def _pad_axis(x: Array, axis: int, new: int, value=0) -> Array:
    if x.shape[axis] == new:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, new - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def flash_attention(q_BTHK: Array, k_BSGK: Array, v_BSGK: Array, *, causal: bool = True,
                    segment_ids=None, prefix_k: Array | None = None,
                    prefix_v: Array | None = None, scale: float | None = None,
                    block_q: int | None = None,
                    block_k: int | None = None,
                    impl: Literal["auto", "pallas", "xla"] = "auto",
                    interpret: bool | None = None,
                    platform: Literal["gpu", "tpu"] | None = None) -> Array:
    """Memory-efficient softmax attention with grouped-query heads and packed sequences.

    Args:
      q_BTHK: queries ``[B, T, H, K]`` (float32, bfloat16 or float16).
      k_BSGK, v_BSGK: keys and values ``[B, S, G, K]``, same dtype; ``G`` divides ``H``.
      causal: query ``t`` sees keys ``s <= t`` (top-left aligned when ``T != S``).
      segment_ids: None, an int ``[B, T]`` array (``T == S``) or a pair ``(q_BT, kv_BS)``; a query
        attends only to keys with its id. A query that sees no key outputs zeros.
      prefix_k, prefix_v: optional prefix keys and values ``[B, S_p, G, K]`` (``S_p >= 1``, any
        size; k's dtype), given together: every query attends to all of them regardless of
        ``causal`` and ``segment_ids`` (ParScale's per-layer prefixes; apply no RoPE to them).
        The real keys keep their positions ``0 .. S-1`` for the causal test.
      scale: score scale; default ``K ** -0.5``.
      block_q, block_k: tile sizes for the forward and backward kernels; default per platform
        (``DEFAULT_BLOCKS``), shrunk for short sequences. Any length works: inputs are padded to a
        multiple of the tile internally.
      impl: "pallas" runs the kernel; "xla" the pure-jnp reference; "auto" the kernel only on a
        platform where its compiled tests have passed (``pallas_kernels._policy.VALIDATED``; none
        yet), else the reference.
      interpret: run the kernel in Pallas's interpreter; default: on CPU.
      platform: which kernel variant to run, "gpu" (Triton, loop schedule) or "tpu" (Mosaic TPU,
        grid schedule); default: the default backend's, "gpu" on CPU. Lets CPU tests run either.

    Returns:
      ``[B, T, H, K]`` in ``q``'s dtype. Differentiable in ``q``, ``k``, ``v`` and the prefix (a
      ``custom_vjp`` whose backward kernels recompute attention from the saved log-sum-exp).

    Raises:
      ValueError: on shapes, dtypes, blocks or options that do not fit, naming the argument.
    """
    impl = resolve_impl(impl)
    if q_BTHK.ndim != 4 or k_BSGK.ndim != 4 or v_BSGK.shape != k_BSGK.shape:
        raise ValueError(f"expected q [B, T, H, K] and k, v [B, S, G, K]; got {q_BTHK.shape}, "
                         f"{k_BSGK.shape}, {v_BSGK.shape}")
    B, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    if k_BSGK.shape[0] != B or k_BSGK.shape[3] != K or H % G:
        raise ValueError(f"k/v {k_BSGK.shape} do not fit q {q_BTHK.shape}: same B and K needed, "
                         "and G must divide H")
    if not (q_BTHK.dtype == k_BSGK.dtype == v_BSGK.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q_BTHK.dtype}, {k_BSGK.dtype}, {v_BSGK.dtype}")
    n_prefix = check_prefix(prefix_k, prefix_v, k_BSGK)
    scale = K**-0.5 if scale is None else scale
    backend = jax.default_backend()
    if impl == "xla":
        return attention_reference(q_BTHK, k_BSGK, v_BSGK, causal=causal, segment_ids=segment_ids,
                                   prefix_k=prefix_k, prefix_v=prefix_v, scale=scale)

    variant = platform or ("tpu" if backend == "tpu" else "gpu")
    if variant not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    interpret = (backend == "cpu") if interpret is None else bool(interpret)
    q_seg_BT, kv_seg_BS = split_segment_ids(segment_ids, T, S)
    spec = make_spec(q_BTHK.shape, k_BSGK.shape, causal=causal, scale=scale,
                     segments=q_seg_BT is not None, variant=variant, interpret=interpret,
                     block_q=block_q, block_k=block_k, n_prefix=n_prefix)

    # Padding: sequences to whole tiles; the head dim to a power of two for Triton.
    k_pad = max(16, _next_pow2(K)) if variant == "gpu" else K
    q = _pad_axis(_pad_axis(q_BTHK, 1, spec.t_pad), 3, k_pad)
    k = _pad_axis(_pad_axis(k_BSGK, 1, spec.s_pad), 3, k_pad)
    v = _pad_axis(_pad_axis(v_BSGK, 1, spec.s_pad), 3, k_pad)
    if n_prefix:  # [B, prefix_pad + s_pad, G, K]: the padded prefix, then the real keys
        k = jnp.concatenate([_pad_axis(_pad_axis(prefix_k, 1, spec.prefix_pad), 3, k_pad), k], 1)
        v = jnp.concatenate([_pad_axis(_pad_axis(prefix_v, 1, spec.prefix_pad), 3, k_pad), v], 1)
    q_seg = kv_seg = None
    if spec.segments:
        q_seg = _pad_axis(q_seg_BT, 1, spec.t_pad, -1)[:, :, None]
        kv_seg = _pad_axis(kv_seg_BS, 1, spec.s_pad, -1)
        if n_prefix:  # the prefix columns' ids are never used
            kv_seg = jnp.pad(kv_seg, ((0, 0), (spec.prefix_pad, 0)), constant_values=-1)
        kv_seg = kv_seg[:, None, :]
    if variant == "tpu":  # [B, H, T, K] layout; segment ids in (8, 128)-tileable shapes
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        if spec.segments:
            q_seg = jnp.broadcast_to(q_seg, (B, spec.t_pad, kernel.TPU_LANES))
            kv_seg = jnp.broadcast_to(kv_seg, (B, kernel.TPU_SUBLANES, kv_seg.shape[-1]))
    out = _flash(spec, q, k, v, q_seg, kv_seg)
    if variant == "tpu":
        out = jnp.swapaxes(out, 1, 2)
    return out[:, :T, :, :K]
