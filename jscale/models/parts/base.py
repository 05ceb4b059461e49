"""What a part is: a residual sub-layer's body, with its own config slice, leaves, apply, counts, FLOPs.

A block of the shared scaffold (:mod:`jscale.models.lm`) is a sequence of residual sub-layers
``x + part(rms_norm(x))``. A part is a frozen dataclass whose fields are its config slice (built by
the family from the family config) and whose methods are:

* ``leaves()`` — the one-layer parameter leaves it declares (:class:`Leaf`: path inside the part, shape
  without ``L``, an initializer). The scaffold stacks them on ``L`` (``w_q_DHK`` → ``w_q_LDHK``) and
  draws every random leaf of the model in one call per distribution (see :func:`jscale.models.lm.init`).
* ``apply(p, h_BTD, ctx, *, prepared, state, layer_input) -> (y_BTD, aux, new_state)`` — on one
  layer's parameters ``p`` (names without ``L``). ``aux`` is a dict of scalar arrays (metrics; keys
  ending ``_loss`` are losses the training core adds to the objective); ``new_state`` is the part's
  updated non-gradient state for this layer (``{}`` when it has none).
* ``prepare(ctx)`` — computed once per forward pass outside the layer scan and handed to every
  layer's ``apply`` as ``prepared`` (RoPE angles); ``None`` by default.
* ``init_state()`` — the part's per-layer non-gradient state (stacked on ``L`` by the scaffold);
  ``{}`` by default.
* ``count()`` — parameters per layer (analytic); ``flops(seq_len)`` — forward FLOPs per token per
  layer (a multiply-add is 2 FLOPs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Normal:
    """Truncated normal (±2 std) with std ``std``; the leaf is init-scaled (``scale_init``)."""

    std: float


@dataclasses.dataclass(frozen=True)
class Uniform:
    """``U(low, high)``, drawn in float32; ``post`` (optional) maps the float32 draw to the value."""

    low: float
    high: float
    post: Callable[[Array], Array] | None = None


@dataclasses.dataclass(frozen=True)
class Const:
    """A constant: ``fill`` (a number) everywhere, or ``fill()`` — a float32 one-layer array."""

    fill: float | Callable[[], Array]


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter leaf of one layer: ``path`` inside the part (the last name carries the shape
    letters, without ``L``), ``shape`` without ``L``, its initializer, and whether it is stored in
    float32 whatever ``param_dtype`` is."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    init: Normal | Uniform | Const
    float32: bool = False


@dataclasses.dataclass(frozen=True)
class Context:
    """What every part of a forward pass may read: the packed-document ids (or ``None``) and the
    positions of the tokens."""

    segment_ids_BT: Array | None
    positions_BT: Array


class Part:
    """Defaults for the optional part methods (a part subclasses this and is a frozen dataclass)."""

    def leaves(self) -> Sequence[Leaf]:
        raise NotImplementedError

    def apply(self, p: dict[str, Any], h_BTD: Array, ctx: Context, *, prepared: Any = None,
              state: Any = None, layer_input: Any = None) -> tuple[Array, dict[str, Array], Any]:
        raise NotImplementedError

    def prepare(self, ctx: Context) -> Any:
        return None

    def init_state(self) -> Any:
        return {}

    def count(self) -> int:
        raise NotImplementedError

    def flops(self, seq_len: int) -> float:
        raise NotImplementedError
