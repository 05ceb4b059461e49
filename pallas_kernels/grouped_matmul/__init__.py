"""Grouped matmul (dropless MoE dispatch) as a Pallas kernel: ``reference`` (the jnp oracles),
``kernel`` (Pallas ``gmm`` and ``tgmm``), ``ops`` (the public ``grouped_matmul`` with
``custom_vjp`` and the impl switch).

``grouped_matmul(lhs_MK, rhs_EKN, group_sizes_E)`` has the contract of
``jax.lax.ragged_dot(lhs, rhs, group_sizes)``: rows of ``lhs`` sorted by group, group ``e``'s rows
multiplied by ``rhs[e]``, rows past ``sum(group_sizes)`` zero.

Letters. The public signature mirrors ``ragged_dot``'s names: M rows (in MoE dispatch, the sorted
token-expert assignments), K the contracted dim, N the output columns, E groups (experts). These K
and N are local to this kernel: in the project glossary (:mod:`jscale.nn`) K is the head dim and N
the SSM state; an MoE layer calls this with (K, N) = (D, F) for the up projections and (F, D) for
the down projection. Inside the kernels (:mod:`.kernel`): C the contracted dim and O the output
dim of one kernel call (forward: C = K, O = N; d-lhs: C = N, O = K), Q a row tile of ``block_m``
rows, and suffixed tiles ``x_QC``, ``w_CO``, ``acc_QO``.
"""

from pallas_kernels.grouped_matmul.ops import grouped_matmul
from pallas_kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

__all__ = ["gmm_reference", "grouped_matmul", "tgmm_reference"]
