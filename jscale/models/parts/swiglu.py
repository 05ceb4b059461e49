"""The SwiGLU feed-forward as a block part: ``(silu(h W_gate) * (h W_up)) W_down``.

Leaves (one layer): ``w_gate_DF``, ``w_up_DF``, ``w_down_FD``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from jscale import nn
from jscale.models.parts.base import Context, Leaf, Normal, Part

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SwiGLU(Part):
    """SwiGLU FFN part of width ``d_ff``. ``out_div`` further divides ``w_down``'s init std (the
    family's residual-depth rescale); ``init_scale`` multiplies every leaf's std. Position-wise:
    decodes with the default methods of :class:`~jscale.models.parts.base.Part`."""

    position_wise = True

    d_model: int
    d_ff: int
    init_scale: float = 1.0
    out_div: float = 1.0

    def leaves(self) -> list[Leaf]:
        D, F, s = self.d_model, self.d_ff, self.init_scale
        return [Leaf(("w_gate_DF",), (D, F), Normal(s / math.sqrt(D))),
                Leaf(("w_up_DF",), (D, F), Normal(s / math.sqrt(D))),
                Leaf(("w_down_FD",), (F, D), Normal(s / self.out_div / math.sqrt(F)))]

    def apply(self, p: dict[str, Any], h_BTD: Array, ctx: Context, *, prepared: Any = None,
              state: Any = None, layer_input: Any = None) -> tuple[Array, dict, Any]:
        return nn.swiglu(h_BTD, p["w_gate_DF"], p["w_up_DF"], p["w_down_FD"]), {}, {}

    def count(self) -> int:
        return 3 * self.d_model * self.d_ff

    def flops(self, seq_len: int) -> float:
        return 2 * 3 * self.d_model * self.d_ff
