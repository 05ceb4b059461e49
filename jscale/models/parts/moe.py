"""The mixture-of-experts FFN as a block part: a float32 router, top-k selection, SwiGLU experts and
optional always-on shared experts.

Letters (the glossary of :mod:`jscale.nn`, plus): inside the part the batch's tokens are flattened,
``T`` = B·T tokens; ``k`` = top_k; ``M`` = T·k assignments (token ``t``'s ``j``-th choice is
assignment ``j·T + t``: choice-major, so first choices come first); ``C`` = expert capacity.

Leaves (one layer): ``w_router_DE`` (float32 whatever ``param_dtype``), ``w_gate_EDF``, ``w_up_EDF``,
``w_down_EFD`` (the routed experts) and, with shared experts, ``shared.w_gate_DF`` /
``shared.w_up_DF`` / ``shared.w_down_FD`` (one SwiGLU of width ``n_shared · d_expert``).

**Routing.** ``logits_TE = h_TD · w_router_DE`` in float32. Scores: the full softmax
(``softmax_topk``) or the logits (``topk_softmax``). Selection: the top k of ``scores + bias_E``; the
bias (per-layer model state, DeepSeek-V3's aux-loss-free balancing) only selects — gate weights come
from the unbiased scores (the k probabilities, or a softmax over the k logits).

**Dropless dispatch** (``capacity_factor=None``): sort the M assignments by expert (stable), count
the group sizes, gather the sorted rows, one grouped matmul per projection
(:func:`grouped_matmul`: ``jax.lax.ragged_dot`` or the Pallas kernel), unsort with the inverse
permutation (a gather), weight by the gates and sum over the k choices. Per token, so causal and
document-isolated.

**Capacity mode** (``capacity_factor=cf``): each expert takes at most ``C = ceil(T·k·cf / E)``
assignments of the batch, in priority order (choice-major: every token's first choice before any
second choice, then token order); the rest are dropped (they contribute nothing: the token keeps its
residual and the shared experts). It uses a **dense einsum over padded per-expert buffers**
``[E, C, D]``: every group has the same static size C, so the grouped matmul degenerates to a
batched matmul, which XLA runs as one dense op with static shapes (nothing for a ragged kernel to
skip), and ``[E, C, D]`` buffers are exactly what a fixed-capacity all-to-all exchanges. It computes
``E·C ≥ T·k`` rows (the padding is not counted in :meth:`MoE.flops`). Which assignments drop depends
on the whole batch, so capacity mode is not causal.

**Expert parallelism** (dropless, under a layout with ``mesh.expert`` > 1; :func:`expert_parallel`).
The routed experts' leaves are split over the ``expert`` axis by their ``E`` dim (``E/expert`` experts
per device, contiguous). The router, its losses, the loads and the bias update stay outside, on the
global arrays (XLA partitions them; they are the one-device numbers); only the expert computation runs
under ``jax.shard_map``. The batch is split over ``data × fsdp`` only, so the ``expert`` devices of
one batch shard hold the same tokens: each takes its own ``1/expert`` share of them (padded to a
multiple), sorts its assignments by expert (hence by destination device), and packs one
**fixed-capacity** buffer per destination, capacity = its whole ``T_share·k`` assignments (the worst
case, so nothing drops), tagged with the local expert id. One ``jax.lax.all_to_all`` sends them
(and one the ids); the receiver sorts the ``expert · T_share·k`` rows by local expert (empty slots
last, outside every group), runs the same grouped matmuls, unsorts, and a reverse ``all_to_all``
brings each result home, where it is gated and summed over the k choices as on one device; a tiled
``all_gather`` over ``expert`` reassembles the batch shard's tokens. With ``tensor`` > 1 the experts'
F is split too and the down projection's partial sums are summed (``psum``) over ``tensor``. Why not
``jax.lax.ragged_all_to_all`` (which sends only the real rows): XLA:CPU cannot run it ("HLO opcode
ragged-all-to-all is not supported by XLA:CPU", jax 0.10.2), and the fixed buffers are what the
partitioner-free path on every backend can do; the buffers cost ``expert×`` the rows of a ragged
exchange (send and receive), and the grouped matmul sees that many rows (on XLA:CPU ``ragged_dot``
computes every row; the ragged kernels on accelerators skip the empty ones). The alternative —
every ``expert`` device computes its own experts' assignments of the replicated tokens and a ``psum``
over ``expert`` combines (no all-to-all) — was measured too. One layer fwd+bwd (B 16 × T 128, D 128,
E 8, F 128, top-2) on 8 fake CPU devices sharing 2 cores (so a measure of total work, not of
scaling), median of 10, two runs: one device 149 / 279 ms; ``expert=8``: all-to-all 141 / 256 ms,
psum 162 ms, XLA's partitioner on the one-device dispatch 184 / 319 ms; ``expert=4, data=2``:
all-to-all 132 / 265 ms, psum 142 ms, partitioner 283 / 550 ms. Capacity mode is left to XLA's partitioner
(its ``[E, C, D]`` buffers are constrained to ``E`` over ``expert``). With no layout, or
``expert`` = 1, the dispatch is exactly the one-device program above.

**Aux** (per layer; the scaffold averages over the layers that report them):
``load_balance_loss`` = coeff·E·Σ_e f_e·P_e (f_e: share of the M assignments selected for e, before
any drop; P_e: mean full-softmax probability), ``router_z_loss`` = coeff·mean_t(logsumexp_e
logits)², ``max_vio`` = (max_e load_e − mean load) / mean load, and in capacity mode
``dropped_fraction``. **State**: ``bias_E`` (float32), updated every forward pass to
``bias_E + rate·sign(mean load − load_E)`` from this batch's loads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jscale import nn
from jscale.models.parts.base import Context, Leaf, Normal, Part
from jscale.sharding import active_layout, constrain, spec_for

Array = jax.Array


def grouped_matmul(lhs_MK: Array, rhs_EKN: Array, group_sizes_E: Array, *, impl: str) -> Array:
    """``out_MN``: rows ``[start_e, start_e + group_sizes_E[e])`` of ``lhs_MK`` times ``rhs_EKN[e]``
    (``jax.lax.ragged_dot``'s contract); the one place the dispatch's grouped matmul is chosen.
    ``impl="xla"``: ``jax.lax.ragged_dot``; ``impl="pallas"``: ``pallas_kernels.grouped_matmul``
    (imported on first use)."""
    if impl == "xla":
        return jax.lax.ragged_dot(lhs_MK, rhs_EKN, group_sizes_E)
    if impl == "pallas":
        from pallas_kernels.grouped_matmul import grouped_matmul as kernel
        return kernel(lhs_MK, rhs_EKN, group_sizes_E, impl="pallas")
    raise ValueError(f"grouped matmul impl {impl!r} is not available")


def route(logits_TE: Array, bias_E: Array, *, top_k: int, router: str
          ) -> tuple[Array, Array, Array]:
    """``(idx_Tk, gates_Tk, probs_TE)``: the selected experts (top k of scores + bias), their gate
    weights (from the unbiased scores) and the full softmax (float32)."""
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    if router == "softmax_topk":
        _, idx_Tk = jax.lax.top_k(probs_TE + bias_E, top_k)
        gates_Tk = jnp.take_along_axis(probs_TE, idx_Tk, axis=-1)
    elif router == "topk_softmax":
        _, idx_Tk = jax.lax.top_k(logits_TE + bias_E, top_k)
        gates_Tk = jax.nn.softmax(jnp.take_along_axis(logits_TE, idx_Tk, axis=-1), axis=-1)
    else:
        raise ValueError(f"router {router!r} is not available")
    return idx_Tk, gates_Tk, probs_TE


def expert_loads(idx_Tk: Array, n_experts: int) -> Array:
    """Assignments per expert, ``load_E`` (float32)."""
    return jnp.bincount(idx_Tk.reshape(-1), length=n_experts).astype(jnp.float32)


def load_balance_loss(probs_TE: Array, idx_Tk: Array, coeff: float) -> Array:
    """Switch/GShard: ``coeff · E · Σ_e f_e · P_e`` (f_e: share of the T·k assignments routed to e;
    P_e: mean router probability). Perfect balance gives ``coeff``."""
    E = probs_TE.shape[-1]
    f_E = expert_loads(idx_Tk, E) / idx_Tk.size
    return coeff * E * jnp.sum(f_E * jnp.mean(probs_TE, axis=0))


def router_z_loss(logits_TE: Array, coeff: float) -> Array:
    """``coeff · mean_t (logsumexp_e logits_te)²`` (ST-MoE)."""
    return coeff * jnp.mean(jax.nn.logsumexp(logits_TE, axis=-1) ** 2)


def max_violation(load_E: Array) -> Array:
    """MaxVio: ``(max_e load_e − mean load) / mean load``."""
    mean = jnp.mean(load_E)
    return (jnp.max(load_E) - mean) / mean


def update_bias(bias_E: Array, load_E: Array, rate: float) -> Array:
    """DeepSeek-V3's aux-loss-free update: ``bias_E + rate · sign(mean load − load_E)``."""
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Assignments an expert takes per batch: ``ceil(T·k·cf / E)``."""
    return math.ceil(n_tokens * top_k * capacity_factor / n_experts)


def _experts_sorted(p: dict[str, Array], x_MD: Array, group_sizes_E: Array, impl: str) -> Array:
    """The routed SwiGLU experts on rows sorted by expert (grouped matmuls)."""
    dt = x_MD.dtype
    gate_MF = grouped_matmul(x_MD, p["w_gate_EDF"].astype(dt), group_sizes_E, impl=impl)
    up_MF = grouped_matmul(x_MD, p["w_up_EDF"].astype(dt), group_sizes_E, impl=impl)
    return grouped_matmul(jax.nn.silu(gate_MF) * up_MF, p["w_down_EFD"].astype(dt), group_sizes_E,
                          impl=impl)


def _experts_buffered(p: dict[str, Array], x_ECD: Array) -> Array:
    """The routed SwiGLU experts on padded per-expert buffers (dense batched matmuls)."""
    dt = x_ECD.dtype
    gate_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, p["w_gate_EDF"].astype(dt))
    up_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, p["w_up_EDF"].astype(dt))
    return jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate_ECF) * up_ECF, p["w_down_EFD"].astype(dt))


def _combine(y_MD: Array, gates_Tk: Array) -> Array:
    """``y_TD``: each token's k expert outputs (choice-major rows) weighted by its gates, summed."""
    T, k = gates_Tk.shape
    gates_M = gates_Tk.T.reshape(T * k)
    return jnp.sum((y_MD * gates_M[:, None].astype(y_MD.dtype)).reshape(k, T, -1), axis=0)


def expert_parallel(p: dict[str, Array], h_TD: Array, idx_Tk: Array, gates_Tk: Array, *,
                    layout: Any, impl: str) -> Array:
    """The dropless routed experts under a layout with ``expert`` > 1 (see the module docstring,
    **Expert parallelism**): ``y_TD``, gated and summed over the k choices, placed like ``h_TD``."""
    sizes = layout.axis_sizes
    X, tp = sizes["expert"], sizes.get("tensor", 1)
    rules = layout.activation_rules  # E → expert, F → tensor; D, C, k unsharded
    w_specs = {name: spec_for(name[-3:], p[name].shape, rules, sizes)
               for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")}
    tok_spec = spec_for("B_", h_TD.shape, rules, sizes)  # tokens over the batch axes (data × fsdp)
    F_split = tp > 1 and w_specs["w_down_EFD"][1:2] == ("tensor",)

    def local(h_TD, idx_Tk, gates_Tk, w_gate_EDF, w_up_EDF, w_down_EFD):
        T_loc, D = h_TD.shape
        k, E_loc = idx_Tk.shape[1], w_gate_EDF.shape[0]
        Ts = -(-T_loc // X)  # this device's share of its batch shard's tokens
        if Ts * X != T_loc:
            pad = Ts * X - T_loc
            h_TD = jnp.pad(h_TD, ((0, pad), (0, 0)))
            idx_Tk, gates_Tk = jnp.pad(idx_Tk, ((0, pad), (0, 0))), jnp.pad(gates_Tk, ((0, pad), (0, 0)))
        i = jax.lax.axis_index("expert")
        h_sD = jax.lax.dynamic_slice_in_dim(h_TD, i * Ts, Ts)
        idx_sk = jax.lax.dynamic_slice_in_dim(idx_Tk, i * Ts, Ts)
        gates_sk = jax.lax.dynamic_slice_in_dim(gates_Tk, i * Ts, Ts)
        Ms = Ts * k
        idx_M = idx_sk.T.reshape(Ms)  # choice-major, as on one device
        order_M = jnp.argsort(idx_M, stable=True)
        dest_sorted_M = idx_M[order_M] // E_loc  # expert shard of each sorted assignment
        count_X = jnp.bincount(idx_M // E_loc, length=X).astype(jnp.int32)
        start_X = jnp.cumsum(count_X) - count_X
        # Fixed-capacity send buffers, C = Ms per destination (the worst case: dropless).
        r_C = jnp.arange(Ms)
        valid_XC = r_C[None] < count_X[:, None]
        pos_XC = jnp.clip(start_X[:, None] + r_C[None], 0, Ms - 1)
        send_XCD = jnp.where(valid_XC[..., None], h_sD[order_M[pos_XC] % Ts], 0)
        send_XC = jnp.where(valid_XC, idx_M[order_M[pos_XC]] % E_loc, E_loc)  # E_loc: empty slot
        recv_XCD = jax.lax.all_to_all(send_XCD, "expert", 0, 0, tiled=True)
        recv_XC = jax.lax.all_to_all(send_XC, "expert", 0, 0, tiled=True)
        e_R = recv_XC.reshape(X * Ms)
        order_R = jnp.argsort(e_R, stable=True)  # empty slots sort last, outside every group
        sizes_E = jnp.sum(e_R[:, None] == jnp.arange(E_loc)[None], axis=0).astype(jnp.int32)
        w = {"w_gate_EDF": w_gate_EDF, "w_up_EDF": w_up_EDF, "w_down_EFD": w_down_EFD}
        y_sorted_RD = _experts_sorted(w, recv_XCD.reshape(X * Ms, D)[order_R], sizes_E, impl)
        if F_split:  # the down projection's partial sums over this device's slice of F
            y_sorted_RD = jax.lax.psum(y_sorted_RD, "tensor")
        inverse_R = jnp.zeros((X * Ms,), jnp.int32).at[order_R].set(
            jnp.arange(X * Ms, dtype=jnp.int32))
        y_XCD = jnp.where((e_R < E_loc)[:, None], y_sorted_RD[inverse_R], 0).reshape(X, Ms, D)
        back_XCD = jax.lax.all_to_all(y_XCD, "expert", 0, 0, tiled=True)
        y_sorted_MD = back_XCD[dest_sorted_M, jnp.arange(Ms) - start_X[dest_sorted_M]]
        inverse_M = jnp.zeros((Ms,), jnp.int32).at[order_M].set(jnp.arange(Ms, dtype=jnp.int32))
        y_sD = _combine(y_sorted_MD[inverse_M], gates_sk)
        return jax.lax.all_gather(y_sD, "expert", axis=0, tiled=True)[:T_loc]

    return jax.shard_map(
        local, mesh=layout.mesh,
        in_specs=(tok_spec, tok_spec, tok_spec, w_specs["w_gate_EDF"], w_specs["w_up_EDF"],
                  w_specs["w_down_EFD"]),
        out_specs=tok_spec, check_vma=False)(
        h_TD, idx_Tk, gates_Tk, p["w_gate_EDF"].astype(h_TD.dtype),
        p["w_up_EDF"].astype(h_TD.dtype), p["w_down_EFD"].astype(h_TD.dtype))


@dataclasses.dataclass(frozen=True)
class MoE(Part):
    """The MoE FFN part (see the module docstring). ``out_div`` further divides the down
    projections' init std (the family's residual-depth rescale); ``init_scale`` multiplies every
    leaf's std (the router's too). Decode (dropless only): the default position-wise methods of
    :class:`~jscale.models.parts.base.Part`, the router bias read for selection, not updated."""

    position_wise = True  # dropless; capacity mode is refused by init_cache and decode

    d_model: int
    n_experts: int
    top_k: int
    d_expert: int
    n_shared_experts: int = 0
    router: str = "softmax_topk"
    capacity_factor: float | None = None
    load_balance_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    bias_update_rate: float = 0.0
    impl: str = "xla"
    init_scale: float = 1.0
    out_div: float = 1.0

    @property
    def d_shared(self) -> int:
        """Width of the shared-expert SwiGLU."""
        return self.n_shared_experts * self.d_expert

    def leaves(self) -> list[Leaf]:
        D, E, F, s = self.d_model, self.n_experts, self.d_expert, self.init_scale
        out = [Leaf(("w_router_DE",), (D, E), Normal(s / math.sqrt(D)), float32=True),
               Leaf(("w_gate_EDF",), (E, D, F), Normal(s / math.sqrt(D))),
               Leaf(("w_up_EDF",), (E, D, F), Normal(s / math.sqrt(D))),
               Leaf(("w_down_EFD",), (E, F, D), Normal(s / self.out_div / math.sqrt(F)))]
        if self.n_shared_experts:
            S = self.d_shared
            out += [Leaf(("shared", "w_gate_DF"), (D, S), Normal(s / math.sqrt(D))),
                    Leaf(("shared", "w_up_DF"), (D, S), Normal(s / math.sqrt(D))),
                    Leaf(("shared", "w_down_FD"), (S, D), Normal(s / self.out_div / math.sqrt(S)))]
        return out

    def init_state(self) -> dict[str, Array]:
        return {"bias_E": jnp.zeros((self.n_experts,), jnp.float32)}

    def init_cache(self, batch_size: int, max_len: int, dtype: Any, *,
                   layer_input: Any = None) -> Any:
        """The default (position-wise) decode cache; refuses capacity mode."""
        self._check_dropless()
        return super().init_cache(batch_size, max_len, dtype, layer_input=layer_input)

    def decode(self, p: dict[str, Any], h_BD: Array, cache: Any, pos: Array, *,
               prepared: Any = None, state: Any = None) -> tuple[Array, Any]:
        """The default (position-wise) decode step; refuses capacity mode."""
        self._check_dropless()
        return super().decode(p, h_BD, cache, pos, prepared=prepared, state=state)

    def _check_dropless(self) -> None:
        if self.capacity_factor is not None:
            raise ValueError(
                "MoE decode needs the dropless dispatch (model.moe.capacity_factor=None): with "
                f"model.moe.capacity_factor={self.capacity_factor} which tokens drop depends on the "
                "whole batch, so a one-token step would not match the full pass")

    def apply(self, p: dict[str, Any], h_BTD: Array, ctx: Context, *, prepared: Any = None,
              state: Any = None, layer_input: Any = None) -> tuple[Array, dict, Any]:
        B, T0, D = h_BTD.shape
        E, k = self.n_experts, self.top_k
        h_TD = h_BTD.reshape(B * T0, D)
        T, M = B * T0, B * T0 * k
        logits_TE = jnp.einsum("td,de->te", h_TD.astype(jnp.float32),
                               p["w_router_DE"].astype(jnp.float32),
                               preferred_element_type=jnp.float32)
        bias_E = state["bias_E"] if state is not None else jnp.zeros((E,), jnp.float32)
        idx_Tk, gates_Tk, probs_TE = route(logits_TE, jax.lax.stop_gradient(bias_E), top_k=k,
                                           router=self.router)
        idx_M = idx_Tk.T.reshape(M)  # choice-major: assignment j·T + t
        token_M = jnp.arange(M) % T
        group_sizes_E = jnp.bincount(idx_M, length=E).astype(jnp.int32)
        order_M = jnp.argsort(idx_M, stable=True)  # sorted position → assignment
        aux = {}
        layout = active_layout()
        n_shards = 1 if layout is None else layout.axis_sizes.get("expert", 1)
        if self.capacity_factor is None and n_shards > 1:  # expert parallelism
            y_TD = expert_parallel(p, h_TD, idx_Tk, gates_Tk, layout=layout, impl=self.impl)
        elif self.capacity_factor is None:
            y_sorted_MD = _experts_sorted(p, h_TD[token_M[order_M]], group_sizes_E, self.impl)
            inverse_M = jnp.zeros((M,), jnp.int32).at[order_M].set(jnp.arange(M, dtype=jnp.int32))
            y_TD = _combine(y_sorted_MD[inverse_M], gates_Tk)
        else:
            C = capacity(T, k, E, self.capacity_factor)
            starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
            pos_sorted_M = jnp.arange(M) - starts_E[idx_M[order_M]]
            pos_M = jnp.zeros((M,), pos_sorted_M.dtype).at[order_M].set(pos_sorted_M)
            keep_M = pos_M < C
            slot_EC = jnp.clip(starts_E[:, None] + jnp.arange(C)[None], 0, M - 1)
            valid_EC = jnp.arange(C)[None] < group_sizes_E[:, None]
            x_ECD = jnp.where(valid_EC[..., None], h_TD[token_M[order_M[slot_EC]]], 0)
            x_ECD = constrain(x_ECD.astype(h_TD.dtype), "ECD")  # E over `expert`; the identity
            y_ECD = constrain(_experts_buffered(p, x_ECD), "ECD")  # with no layout
            y_MD = jnp.where(keep_M[:, None], y_ECD[idx_M, jnp.clip(pos_M, 0, C - 1)], 0)
            aux["dropped_fraction"] = jnp.mean((~keep_M).astype(jnp.float32))
            y_TD = _combine(y_MD, gates_Tk)
        if self.n_shared_experts:
            s = p["shared"]
            y_TD = y_TD + nn.swiglu(h_TD[None], s["w_gate_DF"], s["w_up_DF"], s["w_down_FD"])[0]
        load_E = jax.lax.stop_gradient(group_sizes_E.astype(jnp.float32))
        aux.update(load_balance_loss=load_balance_loss(probs_TE, idx_Tk, self.load_balance_coeff),
                   router_z_loss=router_z_loss(logits_TE, self.z_loss_coeff),
                   max_vio=max_violation(load_E))
        new_state = {"bias_E": update_bias(bias_E, load_E, self.bias_update_rate)}
        return y_TD.reshape(B, T0, D).astype(h_BTD.dtype), aux, new_state

    def count(self) -> int:
        D, E, F = self.d_model, self.n_experts, self.d_expert
        return D * E + E * 3 * D * F + 3 * D * self.d_shared

    def active_count(self) -> int:
        """Parameters a token uses: the router, its ``top_k`` experts and the shared experts."""
        D, E, F = self.d_model, self.n_experts, self.d_expert
        return D * E + self.top_k * 3 * D * F + 3 * D * self.d_shared

    def flops(self, seq_len: int) -> float:
        """The router (``2·D·E``), the ``top_k`` active experts and the shared experts, per token."""
        D, E, F = self.d_model, self.n_experts, self.d_expert
        return 2 * D * E + 2 * 3 * D * F * self.top_k + 2 * 3 * D * self.d_shared
