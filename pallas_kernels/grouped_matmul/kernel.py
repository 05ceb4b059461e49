"""Pallas grouped-matmul kernels: ``gmm`` (forward and d-lhs) and ``tgmm`` (d-rhs) — one group
metadata, one tile math, two schedules.

Letters (see :mod:`pallas_kernels.grouped_matmul`): a kernel multiplies ``x_MC`` (rows sorted by
group) by per-group weights and writes ``y_MO``; C is the contracted dim and O the output-column
dim (forward: C = K, O = N; d-lhs: C = N, O = K). Tiles: Q a row tile (``block_m`` rows), a C tile
(``block_c``), an O tile (``block_o``).

**Group metadata** (:func:`make_group_metadata`, plain jnp in the wrapper). Group ``g`` owns rows
``[offsets[g], offsets[g+1])``; it touches row tiles ``t_lo[g] .. t_hi[g]`` (an empty group is given
the one tile its offset falls in; the last group's range is stretched to the last tile, so that tiles
past ``sum(group_sizes)`` are visited too and come out zero). Listing ``(group, tile)`` pairs group
by group gives a *work list* that is sorted by tile as well (groups are contiguous, so the pairs form
a staircase); a tile shared by two groups — a boundary inside a tile — appears once per group. A
staircase from ``(0, 0)`` to ``(tiles_m - 1, E - 1)`` has at most ``tiles_m + E - 1`` steps: the
list's static length. Padding entries repeat the last pair and compute nothing.

**Tile math.** A (group, row tile) visit masks the rows outside the group: ``gmm`` selects the
group's rows of the product into the output tile (rows of other groups are left alone, rows of no
group stay zero); ``tgmm`` zeroes the other rows of both operands before ``x_QCᵀ · dy_QO``. All
products accumulate in float32 (``HIGHEST`` precision for float32 inputs).

**Schedules.**

* ``variant="tpu"`` — **grid schedule** (Mosaic TPU, in the manner of jax's megablox kernels): the
  work list arrives by scalar prefetch and the grid walks it, ``(tiles_o, work, tiles_c)`` for
  ``gmm`` and ``(tiles_c, tiles_o, work)`` for ``tgmm``. Block index maps read the list, so the
  pipeline DMAs ``rhs[group]`` / the row tile of each visit; revisits of one output block are
  consecutive in the list, so the block stays in VMEM between them ("arbitrary" axes) and each visit
  merges its rows into it (``gmm``) or keeps accumulating the group's scratch (``tgmm``).
* ``variant="gpu"`` — **loop schedule** (Pallas **Triton**, as flash attention's GPU kernel, for the
  same reason: its body runs in Pallas's CPU interpreter, a Mosaic GPU matmul kernel could only be
  lowered there, not tested). Triton has no scalar prefetch and GPU programs run concurrently, so
  no two programs may write one output tile: ``gmm`` launches one program per output tile
  ``(row tile, O tile)`` that loops over the groups meeting its rows (the list's entries for that
  tile, as a ``[lo, hi]`` range) and over C tiles; ``tgmm`` one program per ``(group, C tile,
  O tile)`` that loops over the group's row tiles. An empty group runs no iteration and writes
  zeros.

Inputs arrive padded by ``ops`` to whole tiles (rows to ``block_m``, C and O to their tiles; zero
padding); ``offsets`` are clamped to the true row count.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec:
    """Static description of the kernels of one grouped matmul (hashable: a ``custom_vjp``
    non-differentiable argument).

    Attributes:
      variant: "gpu" (loop schedule, Triton) or "tpu" (grid schedule, Mosaic TPU).
      block_m, block_k, block_n: row, K and N tiles (forward: C = K, O = N; d-lhs swaps the
        roles of K and N; d-rhs tiles its ``[K, N]`` output with them).
      interpret: run the kernels in Pallas's interpreter (CPU).
      num_warps, num_stages: Triton launch parameters (variant "gpu").
    """

    variant: str
    block_m: int
    block_k: int
    block_n: int
    interpret: bool
    num_warps: int = 4
    num_stages: int = 2


class GroupMetadata(NamedTuple):
    """Row ranges of the groups and the work list (see the module docstring); all int32.

    ``offsets [E+1]``; ``tile_group_lo / tile_group_hi [tiles_m]``: the groups meeting each row tile
    (lo > hi: none; the GPU ``gmm``); ``work_groups / work_tiles [tiles_m + E - 1]`` and
    ``num_work [1]``: the work list and its true length (the TPU schedule)."""

    offsets: Array
    tile_group_lo: Array
    tile_group_hi: Array
    work_groups: Array
    work_tiles: Array
    num_work: Array


def _cdiv(a, b: int):
    return (a + b - 1) // b


def make_group_metadata(group_sizes_E: Array, *, m: int, m_pad: int, block_m: int) -> GroupMetadata:
    """Metadata for ``m`` true rows padded to ``m_pad`` (a multiple of ``block_m``)."""
    E = group_sizes_E.shape[0]
    tiles_m = m_pad // block_m
    sizes = jnp.maximum(group_sizes_E.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), m).astype(jnp.int32)  # rows past m belong to no one
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])

    # Row tiles each group touches; an empty group gets the tile its offset is in; the last group
    # also takes the tiles past the end (so gmm visits, and zeroes, every tile).
    t_lo = jnp.minimum(starts // block_m, tiles_m - 1)
    t_hi = jnp.maximum(t_lo, jnp.minimum(_cdiv(ends, block_m), tiles_m) - 1)
    t_hi = t_hi.at[E - 1].set(tiles_m - 1)
    counts = t_hi - t_lo + 1
    cum = jnp.cumsum(counts)
    n_work = tiles_m + E - 1
    w = jnp.arange(n_work, dtype=jnp.int32)
    work_groups = jnp.minimum(jnp.searchsorted(cum, w, side="right"), E - 1).astype(jnp.int32)
    first = cum[work_groups] - counts[work_groups]
    work_tiles = jnp.minimum(t_lo[work_groups] + w - first, t_hi[work_groups]).astype(jnp.int32)

    # Groups meeting the rows of each tile (nonempty ones; empty groups in between are skipped in
    # the kernel): first group ending after the tile's first row .. last starting before its end.
    row0 = jnp.arange(tiles_m, dtype=jnp.int32) * block_m
    lo = jnp.searchsorted(ends, row0, side="right").astype(jnp.int32)
    hi = (jnp.searchsorted(starts, jnp.minimum(row0 + block_m, m), side="left") - 1).astype(
        jnp.int32)
    return GroupMetadata(offsets, lo, hi, work_groups, work_tiles, cum[-1:].astype(jnp.int32))


# -------------------------------------------------------------------------------------------------
# tile math


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _dot(a, b, contract: tuple[int, int]) -> Array:
    """2-D matmul contracting ``a`` axis ``contract[0]`` with ``b`` axis ``contract[1]``; f32."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _row_mask(row0, start, end, shape) -> Array:
    """``shape`` bool, true on the rows ``row0 + i`` of the tile that lie in ``[start, end)``."""
    rows = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= start) & (rows < end)


def _w_contract(transpose_rhs: bool) -> tuple[int, int]:
    """Contraction of ``x_QC`` with a weight tile ``[C, O]`` (or ``[O, C]`` when transposed)."""
    return (1, 1) if transpose_rhs else (1, 0)


def _div(a, b: int):
    """Floor division of a non-negative traced int32 (``lax.div`` lowers everywhere)."""
    return lax.div(a, jnp.int32(b))


# -------------------------------------------------------------------------------------------------
# loop schedule (variant "gpu", Triton)


def _gmm_loop_kernel(offsets_ref, lo_ref, hi_ref, x_ref, w_ref, y_ref, *, spec: Spec, bc: int,
                     bo: int, transpose_rhs: bool):
    bm = spec.block_m
    i = pl.program_id(0)
    n_c = x_ref.shape[1] // bc
    row0 = i * bm

    def group(g, acc_QO):
        start, end = offsets_ref[g], offsets_ref[g + 1]
        mask_QC = _row_mask(row0, start, end, (bm, bc))

        def c_step(kc, acc_QO):
            c0 = pl.multiple_of(kc * bc, bc)
            x_QC = jnp.where(mask_QC, x_ref[:, pl.ds(c0, bc)], 0)
            w = w_ref[g, :, pl.ds(c0, bc)] if transpose_rhs else w_ref[g, pl.ds(c0, bc), :]
            return acc_QO + _dot(x_QC, w, _w_contract(transpose_rhs))

        return lax.fori_loop(0, jnp.where(end > start, n_c, 0), c_step, acc_QO)

    acc_QO = lax.fori_loop(lo_ref[i], hi_ref[i] + 1, group, jnp.zeros((bm, bo), jnp.float32))
    y_ref[...] = acc_QO.astype(y_ref.dtype)


def _tgmm_loop_kernel(offsets_ref, x_ref, dy_ref, dw_ref, *, spec: Spec, bc: int, bo: int):
    bm = spec.block_m
    g = pl.program_id(0)
    start, end = offsets_ref[g], offsets_ref[g + 1]

    def tile(t, acc_CO):
        row0 = pl.multiple_of(t * bm, bm)
        x_QC, dy_QO = x_ref[pl.ds(row0, bm), :], dy_ref[pl.ds(row0, bm), :]
        x_QC = jnp.where(_row_mask(row0, start, end, (bm, bc)), x_QC, 0)
        dy_QO = jnp.where(_row_mask(row0, start, end, (bm, bo)), dy_QO, 0)
        return acc_CO + _dot(x_QC, dy_QO, (0, 0))

    t_end = jnp.where(end > start, _div(end + bm - 1, bm), 0)
    acc_CO = lax.fori_loop(_div(start, bm), t_end, tile, jnp.zeros((bc, bo), jnp.float32))
    dw_ref[...] = acc_CO.astype(dw_ref.dtype)


def _loop_gmm(x, w, meta: GroupMetadata, spec: Spec, *, bc, bo, transpose_rhs, out_dtype):
    M, C = x.shape
    E = w.shape[0]
    O = w.shape[1] if transpose_rhs else w.shape[2]
    bm = spec.block_m
    tiles_m = M // bm
    w_spec = (pl.BlockSpec((E, bo, C), lambda i, j: (0, j, 0)) if transpose_rhs
              else pl.BlockSpec((E, C, bo), lambda i, j: (0, 0, j)))
    return pl.pallas_call(
        functools.partial(_gmm_loop_kernel, spec=spec, bc=bc, bo=bo, transpose_rhs=transpose_rhs),
        grid=(tiles_m, O // bo),
        in_specs=[pl.BlockSpec((E + 1,), lambda i, j: (0,)),
                  pl.BlockSpec((tiles_m,), lambda i, j: (0,)),
                  pl.BlockSpec((tiles_m,), lambda i, j: (0,)),
                  pl.BlockSpec((bm, C), lambda i, j: (i, 0)),
                  w_spec],
        out_specs=pl.BlockSpec((bm, bo), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, O), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=spec.num_warps,
                                                num_stages=spec.num_stages),
        interpret=spec.interpret, name="grouped_matmul_gmm",
    )(meta.offsets, meta.tile_group_lo, meta.tile_group_hi, x, w)


def _loop_tgmm(x, dy, meta: GroupMetadata, spec: Spec, *, num_groups, bc, bo, out_dtype):
    M, C = x.shape
    O = dy.shape[1]
    E = num_groups
    return pl.pallas_call(
        functools.partial(_tgmm_loop_kernel, spec=spec, bc=bc, bo=bo),
        grid=(E, C // bc, O // bo),
        in_specs=[pl.BlockSpec((E + 1,), lambda g, c, o: (0,)),
                  pl.BlockSpec((M, bc), lambda g, c, o: (0, c)),
                  pl.BlockSpec((M, bo), lambda g, c, o: (0, o))],
        out_specs=pl.BlockSpec((None, bc, bo), lambda g, c, o: (g, c, o)),
        out_shape=jax.ShapeDtypeStruct((E, C, O), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=spec.num_warps,
                                                num_stages=spec.num_stages),
        interpret=spec.interpret, name="grouped_matmul_tgmm",
    )(meta.offsets, x, dy)


# -------------------------------------------------------------------------------------------------
# grid schedule (variant "tpu", Mosaic TPU): the work list by scalar prefetch


def _visit(w, offsets_ref, groups_ref, tiles_ref, num_ref, bm: int):
    """Group, row tile, group rows and whether work item ``w`` computes anything."""
    g, t = groups_ref[w], tiles_ref[w]
    start, end = offsets_ref[g], offsets_ref[g + 1]
    row0 = t * bm
    touches = (w < num_ref[0]) & (start < row0 + bm) & (end > row0)
    return g, t, start, end, row0, touches


def _gmm_grid_kernel(offsets_ref, groups_ref, tiles_ref, num_ref, x_ref, w_ref, y_ref, acc_ref, *,
                     spec: Spec, transpose_rhs: bool):
    w, kc = pl.program_id(1), pl.program_id(2)
    _, t, start, end, row0, touches = _visit(w, offsets_ref, groups_ref, tiles_ref, num_ref,
                                             spec.block_m)
    first_visit = (w == 0) | (tiles_ref[jnp.maximum(w - 1, 0)] != t)

    @pl.when(kc == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((kc == 0) & first_visit)  # the output block is fresh: rows of no group stay zero
    def _zero():
        y_ref[...] = jnp.zeros(y_ref.shape, y_ref.dtype)

    @pl.when(touches)
    def _accumulate():
        acc_ref[...] += _dot(x_ref[...], w_ref[...], _w_contract(transpose_rhs))

    @pl.when(touches & (kc == pl.num_programs(2) - 1))
    def _store():  # merge this group's rows into the (resident) output block
        mask = _row_mask(row0, start, end, y_ref.shape)
        y_ref[...] = jnp.where(mask, acc_ref[...].astype(y_ref.dtype), y_ref[...])


def _tgmm_grid_kernel(offsets_ref, groups_ref, tiles_ref, num_ref, x_ref, dy_ref, dw_ref, acc_ref,
                      *, spec: Spec):
    w = pl.program_id(2)
    last = pl.num_programs(2) - 1
    g, _, start, end, row0, touches = _visit(w, offsets_ref, groups_ref, tiles_ref, num_ref,
                                             spec.block_m)

    @pl.when((w == 0) | (groups_ref[jnp.maximum(w - 1, 0)] != g))
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(touches)
    def _accumulate():
        x_QC = jnp.where(_row_mask(row0, start, end, x_ref.shape), x_ref[...], 0)
        dy_QO = jnp.where(_row_mask(row0, start, end, dy_ref.shape), dy_ref[...], 0)
        acc_ref[...] += _dot(x_QC, dy_QO, (0, 0))

    @pl.when((w == last) | (groups_ref[jnp.minimum(w + 1, last)] != g))
    def _store():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def _scalars(meta: GroupMetadata):
    return meta.offsets, meta.work_groups, meta.work_tiles, meta.num_work


def _grid_gmm(x, w, meta: GroupMetadata, spec: Spec, *, bc, bo, transpose_rhs, out_dtype):
    M, C = x.shape
    O = w.shape[1] if transpose_rhs else w.shape[2]
    bm = spec.block_m
    n_work = meta.work_groups.shape[0]

    def x_map(o, w_, c, offsets, groups, tiles, num):
        return tiles[w_], c

    def w_map(o, w_, c, offsets, groups, tiles, num):
        return (groups[w_], o, c) if transpose_rhs else (groups[w_], c, o)

    def y_map(o, w_, c, offsets, groups, tiles, num):
        return tiles[w_], o

    w_block = (None, bo, bc) if transpose_rhs else (None, bc, bo)
    return pl.pallas_call(
        functools.partial(_gmm_grid_kernel, spec=spec, transpose_rhs=transpose_rhs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(O // bo, n_work, C // bc),
            in_specs=[pl.BlockSpec((bm, bc), x_map), pl.BlockSpec(w_block, w_map)],
            out_specs=pl.BlockSpec((bm, bo), y_map),
            scratch_shapes=[pltpu.VMEM((bm, bo), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((M, O), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=spec.interpret, name="grouped_matmul_gmm",
    )(*_scalars(meta), x, w)


def _grid_tgmm(x, dy, meta: GroupMetadata, spec: Spec, *, num_groups, bc, bo, out_dtype):
    C, O = x.shape[1], dy.shape[1]
    bm = spec.block_m
    n_work = meta.work_groups.shape[0]

    def x_map(c, o, w_, offsets, groups, tiles, num):
        return tiles[w_], c

    def dy_map(c, o, w_, offsets, groups, tiles, num):
        return tiles[w_], o

    def dw_map(c, o, w_, offsets, groups, tiles, num):
        return groups[w_], c, o

    return pl.pallas_call(
        functools.partial(_tgmm_grid_kernel, spec=spec),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(C // bc, O // bo, n_work),
            in_specs=[pl.BlockSpec((bm, bc), x_map), pl.BlockSpec((bm, bo), dy_map)],
            out_specs=pl.BlockSpec((None, bc, bo), dw_map),
            scratch_shapes=[pltpu.VMEM((bc, bo), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((num_groups, C, O), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=spec.interpret, name="grouped_matmul_tgmm",
    )(*_scalars(meta), x, dy)


# -------------------------------------------------------------------------------------------------
# entry points (padded inputs)


def gmm(x_MC: Array, w: Array, meta: GroupMetadata, spec: Spec, *, transpose_rhs: bool,
        out_dtype) -> Array:
    """``y_MO[m] = x_MC[m] @ w[group(m)]`` with ``w`` ``[E, C, O]`` (``[E, O, C]`` when
    ``transpose_rhs``); zero rows past the last group. Forward: C = K tiled by ``block_k``, O = N by
    ``block_n``; with ``transpose_rhs`` (d-lhs) the roles swap."""
    bc, bo = (spec.block_n, spec.block_k) if transpose_rhs else (spec.block_k, spec.block_n)
    fn = _grid_gmm if spec.variant == "tpu" else _loop_gmm
    return fn(x_MC, w, meta, spec, bc=bc, bo=bo, transpose_rhs=transpose_rhs, out_dtype=out_dtype)


def tgmm(x_MC: Array, dy_MO: Array, meta: GroupMetadata, spec: Spec, *, num_groups: int,
         out_dtype) -> Array:
    """``dw_ECO[e] = x_MC[rows of e]ᵀ · dy_MO[rows of e]`` (C tiled by ``block_k``, O by
    ``block_n``); zeros for an empty group."""
    fn = _grid_tgmm if spec.variant == "tpu" else _loop_tgmm
    return fn(x_MC, dy_MO, meta, spec, num_groups=num_groups, bc=spec.block_k, bo=spec.block_n,
              out_dtype=out_dtype)
