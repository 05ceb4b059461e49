"""Pure-jnp grouped matmuls: the oracles the Pallas kernels are tested against (beside
``jax.lax.ragged_dot``, which is the ``impl="xla"`` path).

Semantics (those of ``jax.lax.ragged_dot(lhs, rhs, group_sizes)``; letters in
:mod:`pallas_kernels.grouped_matmul`): the rows of ``lhs_MK`` are sorted by group — group ``e`` owns
rows ``[offsets[e], offsets[e + 1])`` with ``offsets = [0, cumsum(group_sizes)]`` — and each of its
rows is multiplied by ``rhs_EKN[e]``. Rows at or past ``sum(group_sizes)`` belong to no group and
give zeros. Products accumulate in float32; the result has ``preferred_element_type`` (default: the
inputs' dtype).

The transposed grouped matmul (``tgmm``, the rhs gradient) is
``out_EKN[e] = lhs[rows of e]ᵀ · dout[rows of e]``: zeros for an empty group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def row_groups(group_sizes_E: Array, m: int) -> Array:
    """``[M]`` int32: the group of every row, ``E`` for a row past ``sum(group_sizes)``."""
    ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
    return jnp.searchsorted(ends_E, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def gmm_reference(lhs_MK: Array, rhs_EKN: Array, group_sizes_E: Array,
                  preferred_element_type=None) -> Array:
    """``out_MN[m] = lhs_MK[m] @ rhs_EKN[group(m)]``, zero rows past the last group (float32 math,
    ``E`` dense matmuls: an oracle, not a fast path)."""
    M, E = lhs_MK.shape[0], rhs_EKN.shape[0]
    out_dtype = preferred_element_type or jnp.result_type(lhs_MK, rhs_EKN)
    onehot_ME = row_groups(group_sizes_E, M)[:, None] == jnp.arange(E)[None, :]
    all_EMN = jnp.einsum("mk,ekn->emn", lhs_MK.astype(jnp.float32), rhs_EKN.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    out_MN = jnp.einsum("me,emn->mn", onehot_ME.astype(jnp.float32), all_EMN,
                        precision=jax.lax.Precision.HIGHEST)
    return out_MN.astype(out_dtype)


def tgmm_reference(lhs_MK: Array, dout_MN: Array, group_sizes_E: Array,
                   preferred_element_type=None) -> Array:
    """``out_EKN[e] = Σ_{rows m of e} lhs_MK[m]ᵀ dout_MN[m]`` (float32 math)."""
    M, E = lhs_MK.shape[0], group_sizes_E.shape[0]
    out_dtype = preferred_element_type or jnp.result_type(lhs_MK, dout_MN)
    onehot_ME = (row_groups(group_sizes_E, M)[:, None] == jnp.arange(E)[None, :])
    out_EKN = jnp.einsum("me,mk,mn->ekn", onehot_ME.astype(jnp.float32),
                         lhs_MK.astype(jnp.float32), dout_MN.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    return out_EKN.astype(out_dtype)
