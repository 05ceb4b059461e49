"""Pallas flash-attention kernels: forward, dq and dk/dv — one tile math, two schedules.

Every kernel walks ``[block_q, block_k]`` tiles of the score matrix with float32 statistics and
accumulators; no ``T × S`` array is ever stored. The backward pass recomputes each tile's
probabilities from the forward's log-sum-exp. The tile math (``_fwd_step``, ``_bwd_step``,
``_block_mask``) is shared; two schedules walk the tiles:

* ``variant="gpu"`` — **loop schedule** on the model's ``[B, T, H, K]`` layout (no transposes). One
  program per ``(b, h, query block)`` loops over key blocks in the kernel (``fori_loop`` with traced
  bounds); dk/dv: one program per ``(b, kv head, key block)`` loops over the query heads of that kv
  head and their query blocks, so GQA never materializes K/V (or dK/dV) per query head.
  Lowered by Pallas's **Triton** backend. Why not Mosaic GPU, JAX's current GPU backend: its
  kernels are written against Hopper primitives (``plgpu.wgmma``, TMA copies, mbarriers, register
  layouts), and in jax 0.10.2 the Mosaic GPU CPU interpreter cannot run them (no ``run_state``,
  ``layout_cast`` or ``load`` rules — tried with jax's own ``attention_mgpu.py``), so such a kernel
  could only be *lowered*, never checked for values, on the CPU machines this project is developed
  on. The Triton path runs this very kernel body in interpret mode on CPU (the tests) and compiles
  it for the GPU; the reference and the ``impl`` switch let a Mosaic GPU kernel replace it once it
  can be tested.
* ``variant="tpu"`` — **grid schedule** for Mosaic TPU on ``[B, H, T, K]`` (``ops`` transposes): the
  reduction axis is the innermost grid axis ("arbitrary"), accumulators live in VMEM scratch, and
  block index maps are clamped so tiles skipped by causality are never DMA'd (the same block index
  twice in a row is not fetched again). Row statistics are stored lane-replicated
  (``[..., 128]``) and segment ids as ``[B, T, 128]`` / ``[B, 8, S]``, the layouts Mosaic TPU tiles.

Causal skipping: tiles wholly above the diagonal are never loaded or computed; tiles wholly below it
(and not in a padded key block, and without segment ids) skip the mask arithmetic.

Prefix keys/values (ParScale, arXiv 2505.10475; ``Spec.n_prefix > 0``): ``ops`` concatenates them
in front of the real keys, padded to ``Spec.prefix_pad`` (a multiple of every key block, so each
key block is wholly prefix or wholly real and the real keys stay block-aligned). Key column ``c <
prefix_pad`` is prefix entry ``c``, visible to every query iff ``c < n_prefix``; column ``c >=
prefix_pad`` is real key ``c - prefix_pad``, under the usual causal / segment / padding test at
that position. Every query visits every prefix block (causality never skips one); the prefix
blocks made only of padding are skipped (never computed, and on the grid schedule never fetched);
the one block holding the prefix's end is masked with the prefix mask (``mask="prefix"``), the
others with none. The key segment ids are padded in front alike (the prefix columns' ids are never
used). dk/dv of the prefix are the gradients of its columns, sliced back out by ``ops``.

Tile letters (beside the model's B T S H G K): Q a query block (``block_q`` rows), C a key block
(``block_k`` columns), U the lanes of a row statistic (1, or 128 lane-replicated on TPU), Y the rows
of a key segment-id tile (1, or a sublane tile of 8).

Inputs arrive padded by ``ops`` to multiples of the block sizes; ``Spec.t`` / ``Spec.s`` are the
true lengths (padded keys are masked; padded queries are sliced off, and their zero cotangents make
them contribute nothing to dk/dv).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

Array = jax.Array

#: Initial running max: finite, so ``m_prev - m_next`` is never ``-inf - -inf``. Masked scores are
#: ``-inf`` and so get probability exactly 0.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
TPU_LANES, TPU_SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec:
    """Static description of one attention call (hashable: it keys the kernels' compilation).

    Attributes:
      variant: "gpu" (loop schedule, ``[B, T, H, K]``) or "tpu" (grid schedule, ``[B, H, T, K]``).
      causal, scale: as in ``ops.flash_attention``.
      t, s: true query / key lengths (inputs are padded to ``t_pad`` / ``s_pad``).
      t_pad, s_pad: padded lengths, multiples of every block size used with them.
      rep: query heads per kv head (``H // G``).
      block_q, block_k: forward tile; block_q_bwd, block_k_bwd: tile of both backward kernels.
      segments: segment ids are passed.
      n_prefix: prefix keys in front of the real ones (0: none); prefix_pad: their padded length,
        a multiple of ``block_k`` and ``block_k_bwd`` (0 without a prefix). The key arrays hold
        ``prefix_pad + s_pad`` columns.
      interpret: run the kernels in Pallas's interpreter (CPU).
      num_warps, num_stages: Triton launch parameters (variant "gpu").
    """

    variant: str
    causal: bool
    scale: float
    t: int
    s: int
    t_pad: int
    s_pad: int
    rep: int
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    segments: bool
    interpret: bool
    n_prefix: int = 0
    prefix_pad: int = 0
    num_warps: int = 4
    num_stages: int = 2

    @property
    def stat_width(self) -> int:
        """Trailing width W of the ``[.., T, W]`` row statistics (lane-replicated on TPU)."""
        return TPU_LANES if self.variant == "tpu" else 1

    @property
    def kv_seg_rows(self) -> int:
        """Leading rows of the ``[B, rows, S]`` key segment ids (a sublane tile on TPU)."""
        return TPU_SUBLANES if self.variant == "tpu" else 1


# -------------------------------------------------------------------------------------------------
# tile math (shared by both schedules)


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _dot(a, b, contract: tuple[int, int]) -> Array:
    """2-D matmul contracting ``a`` axis ``contract[0]`` with ``b`` axis ``contract[1]``; f32."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _expand(stat_QU: Array, n: int) -> Array:
    """Row statistics ``[Q, U]`` (U = 1, or lane-replicated 128) as ``[Q, n]``-broadcastable."""
    w = stat_QU.shape[-1]
    if w == 1 or w == n:
        return stat_QU
    if n < w:
        return stat_QU[:, :n]
    return jnp.tile(stat_QU, (1, n // w))


def _block_mask(q0, k0, bq: int, bk: int, q_seg_QU, kv_seg_YC, spec: Spec) -> Array:
    """``[bq, bk]`` True where query ``q0 + row`` may attend key column ``k0 + col`` of a block of
    real keys (column ``c`` is real key ``c - spec.prefix_pad``)."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if spec.causal or spec.s_pad != spec.s:
        cols = k0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        if spec.prefix_pad:
            cols = cols - spec.prefix_pad
        if spec.causal:
            mask = cols <= q0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        if spec.s_pad != spec.s:
            mask = both(mask, cols < spec.s)
    if spec.segments:
        mask = both(mask, _expand(q_seg_QU, bk) == kv_seg_YC[:1, :])
    return mask


def _tile_mask(kind, q0, k0, bq: int, bk: int, q_seg_QU, kv_seg_YC, spec: Spec) -> Array | None:
    """The mask of a tile by ``kind``: None (no mask), "prefix" (a prefix block holding padding:
    column ``k0 + col`` visible to every query iff it is below ``n_prefix``) or "keys" (a block of
    real keys, :func:`_block_mask`)."""
    if kind is None:
        return None
    if kind == "prefix":
        return k0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1) < spec.n_prefix
    return _block_mask(q0, k0, bq, bk, q_seg_QU, kv_seg_YC, spec)


def _fwd_step(carry, q_QK, k_CK, v_CK, mask, scale: float):
    """One online-softmax update of ``(m, l, acc)`` with a ``[bq, bk]`` tile."""
    m_prev, l_prev, acc_QK = carry
    s_QC = _dot(q_QK, k_CK, (1, 1)) * scale
    if mask is not None:
        s_QC = jnp.where(mask, s_QC, -jnp.inf)
    m_next = jnp.maximum(m_prev, s_QC.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p_QC = jnp.exp(s_QC - _expand(m_next, s_QC.shape[-1]))
    l_next = alpha * l_prev + p_QC.sum(axis=-1, keepdims=True)
    acc_QK = _expand(alpha, acc_QK.shape[-1]) * acc_QK + _dot(p_QC.astype(v_CK.dtype), v_CK, (1, 0))
    return m_next, l_next, acc_QK


def _fwd_init(bq: int, k: int, w: int):
    return (jnp.full((bq, w), MASK_VALUE, jnp.float32), jnp.zeros((bq, w), jnp.float32),
            jnp.zeros((bq, k), jnp.float32))


def _fwd_finish(m_QU, l_QU, acc_QK):
    """Normalized output and log-sum-exp; a row that saw no key gets output 0 and lse 0."""
    empty = l_QU == 0.0
    out_QK = acc_QK / _expand(jnp.where(empty, 1.0, l_QU), acc_QK.shape[-1])
    lse_QU = jnp.where(empty, 0.0, m_QU + jnp.log(jnp.where(empty, 1.0, l_QU)))
    return out_QK, lse_QU


def _bwd_step(q_QK, k_CK, v_CK, do_QK, lse_QU, delta_QU, mask, scale: float):
    """Recomputed probabilities ``p`` and score gradients ``ds`` (unscaled) of one tile."""
    s_QC = _dot(q_QK, k_CK, (1, 1)) * scale
    if mask is not None:
        s_QC = jnp.where(mask, s_QC, -jnp.inf)
    bk = s_QC.shape[-1]
    p_QC = jnp.exp(s_QC - _expand(lse_QU, bk))
    dp_QC = _dot(do_QK, v_CK, (1, 1))
    ds_QC = p_QC * (dp_QC - _expand(delta_QU, bk))
    return p_QC, ds_QC


def _div(a, b: int):
    """Floor division of a non-negative traced int32 (``lax.div`` lowers everywhere; ``//`` not)."""
    return lax.div(a, jnp.int32(b))


def _prefix_blocks(bk: int, spec: Spec) -> tuple[int, int, int]:
    """Static prefix key blocks of size ``bk``: ``(full, end, off)`` — unmasked ``[0, full)``,
    the one holding the prefix's end (masked) ``[full, end)``, padding only ``[end, off)``; real
    key block ``r`` is block ``off + r``. ``(0, 0, 0)`` without a prefix."""
    return spec.n_prefix // bk, -(-spec.n_prefix // bk), spec.prefix_pad // bk


def _in(x, lo, hi):
    """``lo <= x < hi`` (a traced bool), leaving out a bound that is the literal 0 / None."""
    cond = None
    if not (isinstance(lo, int) and lo == 0):
        cond = x >= lo
    if hi is not None:
        cond = x < hi if cond is None else cond & (x < hi)
    return cond


def _kv_range(i, bq: int, bk: int, spec: Spec):
    """Real-key blocks of query block ``i`` (counted from the first real one): unmasked ``[0,
    n_full)``, masked ``[n_full, n_end)``."""
    nk = jnp.int32(spec.s_pad // bk)
    n_end = jnp.minimum(nk, _div((i + 1) * bq + bk - 1, bk)) if spec.causal else nk
    if spec.segments:
        return jnp.int32(0), n_end
    n_full = jnp.minimum(n_end, jnp.int32(spec.s // bk))  # blocks with no padded key
    if spec.causal:  # (j + 1) * bk - 1 <= i * bq: every key precedes every query
        n_full = jnp.minimum(n_full, _div(i * bq + 1, bk))
    return n_full, n_end


def _kv_steps(i, bq: int, bk: int, spec: Spec) -> list[tuple]:
    """The key blocks query block ``i`` visits, in order, as ranges ``(lo, hi, mask kind)`` of
    block indices into the (prefix + real) key array; kinds as in :func:`_tile_mask`."""
    n_full, n_end = _kv_range(i, bq, bk, spec)
    if not spec.n_prefix:
        return [(0, n_full, None), (n_full, n_end, "keys")]
    full, end, off = _prefix_blocks(bk, spec)
    steps = [(0, full, None)] if full else []
    steps += [(full, end, "prefix")] if end > full else []
    return steps + [(off, off + n_full, None), (off + n_full, off + n_end, "keys")]


def _q_range_keys(j, bq: int, bk: int, spec: Spec):
    """Query blocks of real-key block ``j``: masked ``[first, m_end)``, unmasked ``[m_end, nq)``."""
    nq = jnp.int32(spec.t_pad // bq)
    first = _div(j * bk, bq) if spec.causal else jnp.int32(0)
    if spec.segments:
        return first, nq
    if spec.causal:  # i * bq >= (j + 1) * bk - 1: every query follows every key
        m_end = jnp.minimum(jnp.maximum(_div((j + 1) * bk - 1 + bq - 1, bq), first), nq)
    else:
        m_end = first
    if spec.s_pad != spec.s:  # a key block holding padding is masked throughout
        m_end = jnp.where((j + 1) * bk > spec.s, nq, m_end)
    return first, m_end


def _q_range(j, bq: int, bk: int, spec: Spec):
    """Query blocks of key block ``j`` (counting the prefix blocks): masked ``[first, m_end)``, unmasked
    ``[m_end, nq)``. A prefix block is seen by every query block — unmasked, or masked throughout
    when it holds the prefix's end — and one of padding only by none (``first = m_end = nq``)."""
    if not spec.n_prefix:
        return _q_range_keys(j, bq, bk, spec)
    nq = jnp.int32(spec.t_pad // bq)
    full, end, off = _prefix_blocks(bk, spec)
    first_keys, m_end_keys = _q_range_keys(jnp.maximum(j - off, 0), bq, bk, spec)
    in_prefix = j < off
    first = jnp.where(in_prefix, jnp.where(j < end, 0, nq), first_keys)
    m_end = jnp.where(in_prefix, jnp.where(j < full, 0, nq), m_end_keys)
    return first, m_end


def _q_steps(j, bq: int, bk: int, spec: Spec) -> list[tuple]:
    """The query blocks key block ``j`` is seen by, as ranges ``(lo, hi, mask kind)``."""
    first, m_end = _q_range(j, bq, bk, spec)
    nq = spec.t_pad // bq
    if not spec.n_prefix:
        return [(first, m_end, "keys"), (m_end, nq, None)]
    full, end, off = _prefix_blocks(bk, spec)
    in_prefix = j < off
    steps = [(first, jnp.where(in_prefix, m_end, first), "prefix")] if end > full else []
    return steps + [(first, jnp.where(in_prefix, first, m_end), "keys"), (m_end, nq, None)]


def kv_block_index(i, j, bq: int, bk: int, spec: Spec):
    """Grid schedule, forward and dq: the key block fetched at grid point (query block ``i``, key
    block ``j``). Causally skipped blocks repeat the last needed one, prefix blocks of padding the
    last prefix block (no new DMA); always in ``[0, (prefix_pad + s_pad) // bk)``."""
    full, end, off = _prefix_blocks(bk, spec)
    n_end = _kv_range(i, bq, bk, spec)[1]
    index = jnp.minimum(j, (n_end + off if off else n_end) - 1)
    if end < off:
        index = jnp.where((j >= end) & (j < off), end - 1, index)
    return index


def q_block_index(j, i, bq: int, bk: int, spec: Spec):
    """Grid schedule, dk/dv: the query block fetched at grid point (key block ``j``, query block
    ``i``). Causally skipped blocks repeat the first needed one (no new DMA). A key block that no
    query sees (causal with ``T < S``: its first query block is past the last one) computes
    nothing, and fetches the last query block so the DMA stays in ``[0, t_pad // bq)``."""
    nq = jnp.int32(spec.t_pad // bq)
    return jnp.minimum(jnp.maximum(i, _q_range(j, bq, bk, spec)[0]), nq - 1)


def _unpack(refs, n_in: int, spec: Spec):
    """Split ``refs`` into inputs (with ``None`` segment refs when absent) and the rest."""
    refs = list(refs)
    if spec.segments:
        return refs[:n_in + 2], refs[n_in + 2:]
    return refs[:n_in] + [None, None], refs[n_in:]


# -------------------------------------------------------------------------------------------------
# loop schedule (variant "gpu"): [B, T, H, K]; grid (B, H, nq) / (B, G, nk)


def _kv_block(j, k_ref, v_ref, kvseg_ref, q0, bq: int, bk: int, q_seg, kind, spec: Spec):
    """The ``j``-th K/V block of the loop schedule and its mask of ``kind`` (:func:`_tile_mask`)
    against the query block starting at ``q0``."""
    k0 = pl.multiple_of(j * bk, bk)
    k_CK, v_CK = k_ref[pl.ds(k0, bk), :], v_ref[pl.ds(k0, bk), :]
    kv_seg = kvseg_ref[:, pl.ds(k0, bk)] if spec.segments and kind == "keys" else None
    return k_CK, v_CK, _tile_mask(kind, q0, k0, bq, bk, q_seg, kv_seg, spec)


def _fwd_loop_kernel(*refs, spec: Spec):
    (q_ref, k_ref, v_ref, qseg_ref, kvseg_ref), (o_ref, lse_ref) = _unpack(refs, 3, spec)
    bq, bk = spec.block_q, spec.block_k
    i = pl.program_id(2)
    q_QK = q_ref[...]
    q_seg = qseg_ref[...] if spec.segments else None

    def body(j, carry, kind):
        k_CK, v_CK, mask = _kv_block(j, k_ref, v_ref, kvseg_ref, i * bq, bq, bk, q_seg, kind, spec)
        return _fwd_step(carry, q_QK, k_CK, v_CK, mask, spec.scale)

    steps = _kv_steps(i, bq, bk, spec)
    carry = _fwd_init(bq, q_QK.shape[-1], 1)
    for lo, hi, kind in steps:
        carry = lax.fori_loop(lo, hi, functools.partial(body, kind=kind), carry)
    out_QK, lse_Q1 = _fwd_finish(*carry)
    o_ref[...] = out_QK.astype(o_ref.dtype)
    lse_ref[...] = lse_Q1


def _dq_loop_kernel(*refs, spec: Spec):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref), (dq_ref,) = _unpack(
        refs, 6, spec)
    bq, bk = spec.block_q_bwd, spec.block_k_bwd
    i = pl.program_id(2)
    q_QK, do_QK, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = qseg_ref[...] if spec.segments else None

    def body(j, dq_QK, kind):
        k_CK, v_CK, mask = _kv_block(j, k_ref, v_ref, kvseg_ref, i * bq, bq, bk, q_seg, kind, spec)
        _, ds_QC = _bwd_step(q_QK, k_CK, v_CK, do_QK, lse, delta, mask, spec.scale)
        return dq_QK + _dot(ds_QC.astype(k_CK.dtype), k_CK, (1, 0))

    steps = _kv_steps(i, bq, bk, spec)
    dq_QK = jnp.zeros(q_QK.shape, jnp.float32)
    for lo, hi, kind in steps:
        dq_QK = lax.fori_loop(lo, hi, functools.partial(body, kind=kind), dq_QK)
    dq_ref[...] = (dq_QK * spec.scale).astype(dq_ref.dtype)


def _dkv_loop_kernel(*refs, spec: Spec):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref), (dk_ref, dv_ref) = (
        _unpack(refs, 6, spec))
    bq, bk = spec.block_q_bwd, spec.block_k_bwd
    j = pl.program_id(2)
    k_CK, v_CK = k_ref[...], v_ref[...]
    kv_seg = kvseg_ref[...] if spec.segments else None
    steps = _q_steps(j, bq, bk, spec)

    def body(i, carry, r, kind):
        dk_CK, dv_CK = carry
        q0 = pl.multiple_of(i * bq, bq)
        q_QK, do_QK = q_ref[pl.ds(q0, bq), r, :], do_ref[pl.ds(q0, bq), r, :]
        lse, delta = lse_ref[r, pl.ds(q0, bq), :], delta_ref[r, pl.ds(q0, bq), :]
        mask = None
        if kind is not None:
            q_seg = qseg_ref[pl.ds(q0, bq), :] if spec.segments and kind == "keys" else None
            mask = _tile_mask(kind, q0, j * bk, bq, bk, q_seg, kv_seg, spec)
        p_QC, ds_QC = _bwd_step(q_QK, k_CK, v_CK, do_QK, lse, delta, mask, spec.scale)
        dv_CK = dv_CK + _dot(p_QC.astype(do_QK.dtype), do_QK, (0, 0))
        dk_CK = dk_CK + _dot(ds_QC.astype(q_QK.dtype), q_QK, (0, 0))
        return dk_CK, dv_CK

    def head(r, carry):  # the query heads that share this kv head
        for lo, hi, kind in steps:
            carry = lax.fori_loop(lo, hi, functools.partial(body, r=r, kind=kind), carry)
        return carry

    zeros = jnp.zeros(k_CK.shape, jnp.float32)
    dk_CK, dv_CK = lax.fori_loop(0, spec.rep, head, (zeros, zeros))
    dk_ref[...] = (dk_CK * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_CK.astype(dv_ref.dtype)


def _loop_forward(q, k, v, q_seg, kv_seg, spec: Spec):
    B, T, H, K = q.shape
    S = k.shape[1]
    bq, rep = spec.block_q, spec.rep
    in_specs = [pl.BlockSpec((None, bq, None, K), lambda b, h, i: (b, i, h, 0)),
                pl.BlockSpec((None, S, None, K), lambda b, h, i: (b, 0, _div(h, rep), 0)),
                pl.BlockSpec((None, S, None, K), lambda b, h, i: (b, 0, _div(h, rep), 0))]
    args = [q, k, v]
    if spec.segments:
        in_specs += [pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
                     pl.BlockSpec((None, 1, S), lambda b, h, i: (b, 0, 0))]
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        functools.partial(_fwd_loop_kernel, spec=spec),
        grid=(B, H, T // bq),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, K), lambda b, h, i: (b, i, h, 0)),
                   pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, T, 1), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=spec.num_warps,
                                                num_stages=spec.num_stages),
        interpret=spec.interpret, name="flash_attention_fwd",
    )(*args)


def _loop_backward(q, k, v, q_seg, kv_seg, lse, delta, do, spec: Spec):
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    bq, bk, rep = spec.block_q_bwd, spec.block_k_bwd, spec.rep
    params = pltriton.CompilerParams(num_warps=spec.num_warps, num_stages=spec.num_stages)

    # dq: one program per (b, h, query block), looping over key blocks.
    q_blk = pl.BlockSpec((None, bq, None, K), lambda b, h, i: (b, i, h, 0))
    kv_all = pl.BlockSpec((None, S, None, K), lambda b, h, i: (b, 0, _div(h, rep), 0))
    stat_blk = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    in_specs = [q_blk, kv_all, kv_all, q_blk, stat_blk, stat_blk]
    args = [q, k, v, do, lse, delta]
    if spec.segments:
        in_specs += [pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
                     pl.BlockSpec((None, 1, S), lambda b, h, i: (b, 0, 0))]
        args += [q_seg, kv_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_loop_kernel, spec=spec), grid=(B, H, T // bq),
        in_specs=in_specs, out_specs=q_blk, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=spec.interpret, name="flash_attention_dq",
    )(*args)

    # dk, dv: one program per (b, kv head, key block), looping over its query heads and blocks.
    q_grp = pl.BlockSpec((None, T, rep, K), lambda b, g, j: (b, 0, g, 0))
    kv_blk = pl.BlockSpec((None, bk, None, K), lambda b, g, j: (b, j, g, 0))
    stat_grp = pl.BlockSpec((None, rep, T, 1), lambda b, g, j: (b, g, 0, 0))
    in_specs = [q_grp, kv_blk, kv_blk, q_grp, stat_grp, stat_grp]
    if spec.segments:
        in_specs += [pl.BlockSpec((None, T, 1), lambda b, g, j: (b, 0, 0)),
                     pl.BlockSpec((None, 1, bk), lambda b, g, j: (b, 0, j))]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_loop_kernel, spec=spec), grid=(B, G, S // bk),
        in_specs=in_specs, out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=spec.interpret, name="flash_attention_dkv",
    )(*args)
    return dq, dk, dv


# -------------------------------------------------------------------------------------------------
# grid schedule (variant "tpu"): [B, H, T, K]; grid (B, H, nq, nk) / (B, G, nk, rep, nq)


def _grid_mask(kind, i, j, bq: int, bk: int, qseg_ref, kvseg_ref, spec: Spec):
    """Grid schedule: the mask of ``kind`` of tile (query block ``i``, key block ``j``); segment
    ids are read only for "keys"."""
    if kind is None:
        return None
    segs = spec.segments and kind == "keys"
    return _tile_mask(kind, i * bq, j * bk, bq, bk, qseg_ref[...] if segs else None,
                      kvseg_ref[...] if segs else None, spec)


def _fwd_grid_kernel(*refs, spec: Spec):
    (q_ref, k_ref, v_ref, qseg_ref, kvseg_ref), (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _unpack(
        refs, 3, spec)
    bq, bk = spec.block_q, spec.block_k
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...], l_scr[...], acc_scr[...] = _fwd_init(bq, acc_scr.shape[-1], TPU_LANES)

    def step(kind):
        mask = _grid_mask(kind, i, j, bq, bk, qseg_ref, kvseg_ref, spec)
        carry = (m_scr[...], l_scr[...], acc_scr[...])
        m_scr[...], l_scr[...], acc_scr[...] = _fwd_step(carry, q_ref[...], k_ref[...], v_ref[...],
                                                         mask, spec.scale)

    for lo, hi, kind in _kv_steps(i, bq, bk, spec):
        pl.when(_in(j, lo, hi))(functools.partial(step, kind))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        out_QK, lse_QU = _fwd_finish(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out_QK.astype(o_ref.dtype)
        lse_ref[...] = lse_QU


def _dq_grid_kernel(*refs, spec: Spec):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref), (dq_ref, dq_scr) = (
        _unpack(refs, 6, spec))
    bq, bk = spec.block_q_bwd, spec.block_k_bwd
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def step(kind):
        mask = _grid_mask(kind, i, j, bq, bk, qseg_ref, kvseg_ref, spec)
        k_CK = k_ref[...]
        _, ds_QC = _bwd_step(q_ref[...], k_CK, v_ref[...], do_ref[...], lse_ref[...],
                             delta_ref[...], mask, spec.scale)
        dq_scr[...] += _dot(ds_QC.astype(k_CK.dtype), k_CK, (1, 0))

    for lo, hi, kind in _kv_steps(i, bq, bk, spec):
        pl.when(_in(j, lo, hi))(functools.partial(step, kind))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * spec.scale).astype(dq_ref.dtype)


def _dkv_grid_kernel(*refs, spec: Spec):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref), (
        dk_ref, dv_ref, dk_scr, dv_scr) = _unpack(refs, 6, spec)
    bq, bk = spec.block_q_bwd, spec.block_k_bwd
    j, r, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((r == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def step(kind):
        mask = _grid_mask(kind, i, j, bq, bk, qseg_ref, kvseg_ref, spec)
        q_QK, do_QK = q_ref[...], do_ref[...]
        p_QC, ds_QC = _bwd_step(q_QK, k_ref[...], v_ref[...], do_QK, lse_ref[...], delta_ref[...],
                                mask, spec.scale)
        dv_scr[...] += _dot(p_QC.astype(do_QK.dtype), do_QK, (0, 0))
        dk_scr[...] += _dot(ds_QC.astype(q_QK.dtype), q_QK, (0, 0))

    nq = spec.t_pad // bq
    for lo, hi, kind in _q_steps(j, bq, bk, spec):
        pl.when(_in(i, lo, None if isinstance(hi, int) and hi == nq else hi))(
            functools.partial(step, kind))

    @pl.when((r == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * spec.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _grid_forward(q, k, v, q_seg, kv_seg, spec: Spec):
    B, H, T, K = q.shape
    S = k.shape[2]
    bq, bk, rep, W = spec.block_q, spec.block_k, spec.rep, TPU_LANES

    def kv_block(b, h, i, j):
        return kv_block_index(i, j, bq, bk, spec)

    in_specs = [pl.BlockSpec((None, None, bq, K), lambda b, h, i, j: (b, h, i, 0)),
                pl.BlockSpec((None, None, bk, K),
                             lambda b, h, i, j: (b, _div(h, rep), kv_block(b, h, i, j), 0)),
                pl.BlockSpec((None, None, bk, K),
                             lambda b, h, i, j: (b, _div(h, rep), kv_block(b, h, i, j), 0))]
    args = [q, k, v]
    if spec.segments:
        in_specs += [pl.BlockSpec((None, bq, W), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, TPU_SUBLANES, bk),
                                  lambda b, h, i, j: (b, 0, kv_block(b, h, i, j)))]
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        functools.partial(_fwd_grid_kernel, spec=spec),
        grid=(B, H, T // bq, S // bk),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, K), lambda b, h, i, j: (b, h, i, 0)),
                   pl.BlockSpec((None, None, bq, W), lambda b, h, i, j: (b, h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, T, W), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, W), jnp.float32), pltpu.VMEM((bq, W), jnp.float32),
                        pltpu.VMEM((bq, K), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=spec.interpret, name="flash_attention_fwd",
    )(*args)


def _grid_backward(q, k, v, q_seg, kv_seg, lse, delta, do, spec: Spec):
    B, H, T, K = q.shape
    G, S = k.shape[1], k.shape[2]
    bq, bk, rep, W = spec.block_q_bwd, spec.block_k_bwd, spec.rep, TPU_LANES

    # dq: grid (b, h, query block, key block).
    def kv_block(b, h, i, j):
        return kv_block_index(i, j, bq, bk, spec)

    q_blk = pl.BlockSpec((None, None, bq, K), lambda b, h, i, j: (b, h, i, 0))
    kv_blk = pl.BlockSpec((None, None, bk, K),
                          lambda b, h, i, j: (b, _div(h, rep), kv_block(b, h, i, j), 0))
    stat_blk = pl.BlockSpec((None, None, bq, W), lambda b, h, i, j: (b, h, i, 0))
    in_specs = [q_blk, kv_blk, kv_blk, q_blk, stat_blk, stat_blk]
    args = [q, k, v, do, lse, delta]
    if spec.segments:
        in_specs += [pl.BlockSpec((None, bq, W), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, TPU_SUBLANES, bk),
                                  lambda b, h, i, j: (b, 0, kv_block(b, h, i, j)))]
        args += [q_seg, kv_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_grid_kernel, spec=spec), grid=(B, H, T // bq, S // bk),
        in_specs=in_specs, out_specs=q_blk, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, K), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=spec.interpret, name="flash_attention_dq",
    )(*args)

    # dk, dv: grid (b, kv head, key block, query head within the group, query block).
    def q_block(b, g, j, r, i):
        return q_block_index(j, i, bq, bk, spec)

    q_blk = pl.BlockSpec((None, None, bq, K),
                         lambda b, g, j, r, i: (b, g * rep + r, q_block(b, g, j, r, i), 0))
    kv_blk = pl.BlockSpec((None, None, bk, K), lambda b, g, j, r, i: (b, g, j, 0))
    stat_blk = pl.BlockSpec((None, None, bq, W),
                            lambda b, g, j, r, i: (b, g * rep + r, q_block(b, g, j, r, i), 0))
    in_specs = [q_blk, kv_blk, kv_blk, q_blk, stat_blk, stat_blk]
    if spec.segments:
        in_specs += [pl.BlockSpec((None, bq, W),
                                  lambda b, g, j, r, i: (b, q_block(b, g, j, r, i), 0)),
                     pl.BlockSpec((None, TPU_SUBLANES, bk), lambda b, g, j, r, i: (b, 0, j))]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_grid_kernel, spec=spec), grid=(B, G, S // bk, rep, T // bq),
        in_specs=in_specs, out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, K), jnp.float32), pltpu.VMEM((bk, K), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=spec.interpret, name="flash_attention_dkv",
    )(*args)
    return dq, dk, dv


# -------------------------------------------------------------------------------------------------
# entry points (kernel layout, padded inputs)


def forward(q, k, v, q_seg, kv_seg, spec: Spec) -> tuple[Array, Array]:
    """``(out, lse)``: ``out`` like ``q``; ``lse`` float32 ``[B, H, T, spec.stat_width]``. ``k``,
    ``v`` and ``kv_seg`` hold ``spec.prefix_pad`` prefix columns before the real keys."""
    fn = _grid_forward if spec.variant == "tpu" else _loop_forward
    return tuple(fn(q, k, v, q_seg, kv_seg, spec))


def backward(q, k, v, q_seg, kv_seg, lse, delta, do, spec: Spec) -> tuple[Array, Array, Array]:
    """``(dq, dk, dv)``; ``delta = rowsum(out * do)`` laid out like ``lse``; ``dk``, ``dv`` like
    ``k``, ``v`` (prefix columns included)."""
    fn = _grid_backward if spec.variant == "tpu" else _loop_backward
    return fn(q, k, v, q_seg, kv_seg, lse, delta, do, spec)
