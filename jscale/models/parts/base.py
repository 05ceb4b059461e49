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

**Decode** (one token at a time, :mod:`jscale.models.decode`), two more methods:

* ``init_cache(batch_size, max_len, dtype, *, layer_input=None) -> cache`` — one layer's empty decode
  cache for ``batch_size`` rows and up to ``max_len`` tokens (a dict of arrays named by their shape
  letters, without ``L``; ``{}`` for none; ``dtype`` is the compute dtype). ``layer_input`` is this
  layer's slice of the layer inputs the full pass would take (attention preloads a prefix KV from
  it); the cache is all a decode step sees of it.
* ``decode(p, h_BD, cache, pos, *, prepared=None, state=None) -> (y_BD, new_cache)`` — the part on
  the token at position ``pos`` (a traced int32 scalar, the same for every row) of each row, ``[B, D]``,
  given the cache of the tokens before it. ``prepared`` is ``prepare`` of the one-token context
  (:func:`decode_context`); ``state`` the layer's non-gradient state, read but not updated (the
  state a decode step would return is dropped, as is ``apply``'s aux).

The defaults serve a **position-wise** part (``position_wise = True``: each token's output depends on
that token alone, e.g. an FFN): no cache (or just its layer input, kept for every step), and
``decode`` runs ``apply`` on ``[B, 1, D]``. A part that mixes positions (attention, a recurrent mixer)
must override both; the defaults refuse it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

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
    """What every part of a forward pass may read: the packed-document ids (or ``None``), the
    positions of the tokens and, for a member of a packed group of different shapes, its true sizes
    (``pack``: the model state's ``"pack"`` entry, :mod:`jscale.models.packing`; ``None`` otherwise)."""

    segment_ids_BT: Array | None
    positions_BT: Array
    pack: Any = None


def decode_context(pos: Array, batch_size: int) -> Context:
    """The context of one decode step: every row's one token at position ``pos`` (no segments)."""
    return Context(segment_ids_BT=None,
                   positions_BT=jnp.full((batch_size, 1), pos, jnp.int32))


class Part:
    """Defaults for the optional part methods (a part subclasses this and is a frozen dataclass).

    ``position_wise`` (a class attribute, not a field): whether each token's output depends on that
    token alone, which makes the default decode methods right for the part."""

    position_wise = False

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

    def init_cache(self, batch_size: int, max_len: int, dtype: Any, *,
                   layer_input: Any = None) -> Any:
        """A position-wise part's decode cache: ``{}``, or its layer input (``{"layer_input": ...}``)
        for every step's ``apply``."""
        self._check_position_wise()
        return {} if layer_input is None else {"layer_input": layer_input}

    def decode(self, p: dict[str, Any], h_BD: Array, cache: Any, pos: Array, *,
               prepared: Any = None, state: Any = None) -> tuple[Array, Any]:
        """A position-wise part on one token per row: ``apply`` on ``[B, 1, D]``; the cache is
        passed through."""
        self._check_position_wise()
        ctx = decode_context(pos, h_BD.shape[0])
        y_BTD, _, _ = self.apply(p, h_BD[:, None], ctx, prepared=prepared, state=state,
                                 layer_input=(cache or {}).get("layer_input"))
        return y_BTD[:, 0], cache

    def _check_position_wise(self) -> None:
        if not self.position_wise:
            raise NotImplementedError(
                f"{type(self).__name__} mixes positions, so it needs decode methods of its own "
                "(init_cache and decode; see jscale.models.parts.base), and has none")
