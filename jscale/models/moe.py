"""The mixture-of-experts sub-config of the transformer: ``TransformerConfig.moe`` (``model.moe.*``).

``model.moe = None`` is the dense transformer; a :class:`MoEConfig` makes the FFN of the chosen layers
an MoE FFN (:class:`jscale.models.parts.moe.MoE`). Which layers: after ``first_dense_layers`` dense
layers, every ``every``-th layer is MoE — layer ``i`` (0-based) is MoE iff
``i >= first_dense_layers`` and ``(i - first_dense_layers) % every == every - 1`` (``every=1``: all of
them; ``every=2``: the second of each pair, as in Switch/GShard). See
:func:`jscale.models.transformer.moe_layer_indices`.

Expert parallelism is a mesh setting, not a field: with ``mesh.expert`` > 1 the routed experts are
split over the ``expert`` axis (``n_experts`` must divide by it; :func:`jscale.mesh.check_mesh`
says so naming ``model.moe.n_experts``) and the dropless dispatch exchanges tokens with all-to-alls
(:func:`jscale.models.parts.moe.expert_parallel`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jscale.config import check

ROUTERS = ("softmax_topk", "topk_softmax")
IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A routed FFN: ``n_experts`` SwiGLU experts of width ``d_expert``, ``top_k`` per token.

    Attributes:
      n_experts: E, routed experts per MoE layer.
      top_k: experts each token is routed to (≤ ``n_experts``).
      d_expert: F of each expert (fine-grained experts: small ``d_expert``); ``None`` means
        ``model.d_ff``.
      n_shared_experts: always-on experts of width ``d_expert`` (one SwiGLU of width
        ``n_shared_experts · d_expert``, applied to every token); 0 for none.
      first_dense_layers: dense layers before the first MoE layer.
      every: after those, every ``every``-th layer is MoE (see the module docstring).
      router: ``"softmax_topk"`` — softmax over all E, then the top k (gate weights the k
        probabilities, not renormalised); ``"topk_softmax"`` — the top k logits, then a softmax over
        those k. The router runs in float32.
      capacity_factor: ``None``: dropless (every assignment is computed). A float: each expert takes
        at most ``ceil(T·k·capacity_factor / E)`` assignments per batch (T: the batch's tokens); the
        overflow skips the experts (the token keeps its residual) and ``dropped_fraction`` reports it.
      load_balance_coeff: Switch/GShard load-balance loss coefficient (``load_balance_loss``).
      z_loss_coeff: router z-loss coefficient (``router_z_loss``).
      bias_update_rate: DeepSeek-V3 aux-loss-free balancing: a per-layer bias added to the scores for
        selection only, ``b_e += rate · sign(mean load - load_e)`` after every step; 0 disables.
      impl: the dispatch's grouped matmul: ``"xla"`` (``jax.lax.ragged_dot``) or ``"pallas"``
        (``pallas_kernels.grouped_matmul``).
    """

    n_experts: int = 8
    top_k: int = 2
    d_expert: int | None = None
    n_shared_experts: int = 0
    first_dense_layers: int = 0
    every: int = 1
    router: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    capacity_factor: float | None = None
    load_balance_coeff: float = 0.01
    z_loss_coeff: float = 0.001
    bias_update_rate: float = 0.0
    impl: Literal["xla", "pallas"] = "xla"

    def __post_init__(self):
        check(self.n_experts >= 1, "model.moe.n_experts", "must be >= 1", self.n_experts)
        check(self.top_k >= 1, "model.moe.top_k", "must be >= 1", self.top_k)
        check(self.top_k <= self.n_experts, "model.moe.top_k",
              f"must be <= model.moe.n_experts={self.n_experts}", self.top_k)
        if self.d_expert is not None:
            check(self.d_expert > 0, "model.moe.d_expert", "must be > 0 (or none: model.d_ff)",
                  self.d_expert)
        check(self.n_shared_experts >= 0, "model.moe.n_shared_experts", "must be >= 0",
              self.n_shared_experts)
        check(self.first_dense_layers >= 0, "model.moe.first_dense_layers", "must be >= 0",
              self.first_dense_layers)
        check(self.every >= 1, "model.moe.every", "must be >= 1", self.every)
        check(self.router in ROUTERS, "model.moe.router", f"must be one of {ROUTERS}", self.router)
        if self.capacity_factor is not None:
            check(self.capacity_factor > 0, "model.moe.capacity_factor",
                  "must be > 0 (or none: dropless)", self.capacity_factor)
        for name in ("load_balance_coeff", "z_loss_coeff", "bias_update_rate"):
            value = getattr(self, name)
            check(value >= 0, f"model.moe.{name}", "must be >= 0", value)
        check(self.impl in IMPLS, "model.moe.impl", f"must be one of {IMPLS}", self.impl)
