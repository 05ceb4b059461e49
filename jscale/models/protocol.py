"""The contract every model family meets; shared code calls it (through :mod:`jscale.models`), never
``getattr``/``hasattr`` on a model config's fields.

A family is one object, registered in :mod:`jscale.registry` under its ``name``. The built-in ones
(:mod:`jscale.models.transformer`, :mod:`jscale.models.mamba`) subclass
:class:`jscale.models.lm.LMFamily`, the shared LM scaffold, and compose its block from parts
(:mod:`jscale.models.parts`); a family may also implement the protocol from scratch.

How to add a family: one module with its frozen config class and a family object (usually an
``LMFamily`` subclass whose ``spec(cfg)`` lists the block's parts), ending in
``registry.register(FamilyObject())``; add the module to :data:`jscale.registry.BUILTIN` (or import
it before use); add a row to the family table in ``tests/families.py``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

Array = jax.Array
Params = dict[str, Any]


@runtime_checkable
class Family(Protocol):
    """A model family. ``cfg`` is always an instance of ``config_cls``.

    Attributes:
      name: the registry name, written as ``model.family`` by ``RunConfig.to_dict``.
      config_cls: the family's frozen, keyword-only config dataclass.
    """

    name: str
    config_cls: type

    def init(self, key: Array, cfg: Any) -> Params:
        """A parameter pytree (nested dicts of arrays, leaf names ending in their shape letters);
        the same key gives the same parameters."""

    def init_model_state(self, cfg: Any) -> Any:
        """Non-gradient training state (e.g. an MoE router bias) as a pytree, carried through
        training and checkpointed; ``{}`` for stateless families."""

    def embed(self, params: Params, tokens_BT: Array, cfg: Any) -> Array:
        """Token ids ``[B, T]`` → embedded inputs ``x_BTD`` in the compute dtype."""

    def hidden(self, params: Params, x_BTD: Array, cfg: Any, *,
               segment_ids_BT: Array | None = None, model_state: Any = None,
               layer_inputs: Any = None) -> tuple[Array, dict[str, Array], Any]:
        """Embedded inputs → ``(x_BTD, aux, new_model_state)``: the final-normed hidden states, a dict
        of scalar arrays (per-layer values averaged over layers; keys ending ``_loss`` are added to
        the training loss) and the updated non-gradient state (``stop_gradient``; ``{}`` when
        stateless). ``segment_ids_BT`` isolates packed documents; ``model_state`` ``None`` means
        :meth:`init_model_state`; ``layer_inputs`` is an optional pytree with a leading ``L`` axis
        handed to the layers' parts (see :mod:`jscale.models.lm`)."""

    def head(self, params: Params, x_BTD: Array, cfg: Any) -> Array:
        """Final-normed hidden states → ``logits_BTV`` in float32."""

    def decode_init(self, params: Params, cfg: Any, batch_size: int, max_len: int) -> Any:
        """An empty incremental-decode cache (a pytree of arrays only, its capacity fixed by its
        shapes) for ``batch_size`` rows and up to ``max_len`` tokens; ``params`` may fill it (a
        family's own prefix keys/values). Scaffold families: :mod:`jscale.models.decode`."""

    def decode_step(self, params: Params, token_B: Array, cache: Any, cfg: Any, *,
                    model_state: Any = None) -> tuple[Array, Any]:
        """One token per row (``token_B``, int) after the tokens ``cache`` holds → ``(logits_BV
        float32, the cache advanced by one token)``; jittable with ``cache`` donated. Fed a
        sequence token by token from :meth:`decode_init`, it gives the full pass's logits at every
        position. ``model_state`` (``None``: :meth:`init_model_state`) is read, not updated."""

    def count_params(self, cfg: Any) -> dict[str, int]:
        """Analytic counts ``{"total", "non_embedding", "embedding", "with_head", "active"}``
        (``active``: parameters used per token; equal to ``total`` for dense families)."""

    def flops_per_token(self, cfg: Any, seq_len: int) -> dict[str, float]:
        """Model FLOPs per token ``{"forward", "training"}`` for sequences of ``seq_len`` tokens (a
        multiply-add is 2 FLOPs; the family's docstring states what is counted)."""

    def scale_init(self, params: Params, init_scale: Array, cfg: Any) -> Params:
        """Parameters initialized with ``init_scale=1`` → as if initialized with ``init_scale`` (a
        possibly traced array: how a sweep varies the init scale per run). ``cfg`` tells which
        leaves the init scale multiplies (they are declared by the parts)."""

    def shape_for_params(self, n_params: float, base_model: Any, **kwargs: Any) -> Any:
        """A config of this family with about ``n_params`` parameters, shaped like ``base_model``
        (keywords: ``aspect_ratio``, ``head_dim``, ``ffn_ratio``, ``max_layers``, ``count_rtol``,
        ``count``, ``min_layers``; see :func:`jscale.models.sizing.shape_for_params`)."""

    def memory_bytes(self, cfg: Any, batch_size: int, seq_len: int) -> int:
        """A rough per-run device footprint of training at this batch and length."""

    def max_seq_len(self, cfg: Any) -> int | None:
        """The longest sequence the model takes, or ``None`` when unbounded."""

    def describe(self, cfg: Any) -> str:
        """A one-line shape summary (``"d_model=128 n_layers=2 ..."``)."""

    def dim_fields(self, cfg: Any) -> dict[str, str]:
        """Logical dim → the config field behind it (``{"D": "model.d_model", "F": "model.d_ff"}``),
        for messages about dims a mesh cannot split."""

    def init_scale(self, cfg: Any) -> float:
        """The init scale ``cfg`` asks for (what :meth:`scale_init` multiplies by)."""

    def param_groups(self, cfg: Any) -> dict[str, tuple[str, ...] | None]:
        """The parameter groups ``train.trainable`` may name: group → the top-level parameter keys
        it trains (``None``: all of them). Every family has ``"all"``; a family adds its own (e.g.
        ParScale's ``"parscale"``: the prefixes and the aggregator)."""
