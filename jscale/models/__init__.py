"""Model families behind one façade: shared code calls these functions, which dispatch on the config's
type through :mod:`jscale.registry` to the family object (the contract:
:class:`jscale.models.protocol.Family`; the shared scaffold: :mod:`jscale.models.lm`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jscale import registry
from jscale.laws.allocation import interpolated_flops_per_token
from jscale.models import mamba, sizing, transformer
from jscale.models.mamba import MambaConfig
from jscale.models.protocol import Family
from jscale.models.transformer import TransformerConfig

__all__ = ["Family", "MambaConfig", "TransformerConfig", "apply", "count_params", "decode_init",
           "decode_step", "describe", "dim_fields", "family_flops_per_token", "family_of",
           "flops_per_token", "forward", "generate", "init", "init_model_state", "init_scale",
           "mamba", "max_seq_len", "memory_bytes", "packing", "scale_init", "shape_for_params",
           "transformer"]

Array = jax.Array


def __getattr__(name: str) -> Any:
    # ``models.packing`` (exact padded packing of different shapes) is imported on first use.
    if name == "packing":
        import importlib
        return importlib.import_module("jscale.models.packing")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def family_of(cfg: Any) -> Family:
    """The family object of model config ``cfg``."""
    return registry.family_of(cfg)


def init(key: Array, cfg: Any) -> dict[str, Any]:
    """Initialize a parameter pytree (nested dict of arrays) for the model described by ``cfg``."""
    return _jitted_init(family_of(cfg))(key, cfg)


@functools.cache
def _jitted_init(family: Family):
    # One compiled program per config instead of hundreds of eagerly dispatched ops.
    return jax.jit(family.init, static_argnums=1)


def init_model_state(cfg: Any) -> Any:
    """The model's non-gradient training state (``{}`` for stateless families)."""
    return family_of(cfg).init_model_state(cfg)


def forward(params: dict[str, Any], tokens_BT: Array, cfg: Any, *,
            segment_ids_BT: Array | None = None, model_state: Any = None,
            layer_inputs: Any = None) -> tuple[Array, dict[str, Array], Any]:
    """Embed → hidden → head: ``(logits_BTV float32, aux, new_model_state)``."""
    family = family_of(cfg)
    x_BTD = family.embed(params, tokens_BT, cfg)
    x_BTD, aux, new_state = family.hidden(params, x_BTD, cfg, segment_ids_BT=segment_ids_BT,
                                          model_state=model_state, layer_inputs=layer_inputs)
    return family.head(params, x_BTD, cfg), aux, new_state


def loss_and_state(params: dict[str, Any], batch: dict[str, Array], cfg: Any,
                   model_state: Any = None) -> tuple[Array, tuple[dict[str, Array], Any]]:
    """The training loss: ``(loss, (metrics, new_model_state))`` — mean next-token cross-entropy
    (float32) of ``batch`` (``inputs``, ``targets`` and optionally ``segment_ids``, each ``[B, T]``)
    plus every auxiliary ``*_loss`` the model reports; ``metrics`` holds ``ce_loss`` and every aux
    value."""
    logits_BTV, aux, new_state = forward(params, batch["inputs"], cfg,
                                         segment_ids_BT=batch.get("segment_ids"),
                                         model_state=model_state)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), batch["targets"]).mean()
    total = ce + sum((v for k, v in aux.items() if k.endswith("_loss")), jnp.zeros((), jnp.float32))
    return total, ({"ce_loss": ce, **aux}, new_state)


def apply(params: dict[str, Any], tokens_BT: Array, cfg: Any, *,
          segment_ids_BT: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Run the model: ``(logits_BTV, aux)``; ``aux`` holds auxiliary losses/metrics (may be empty)."""
    logits_BTV, aux, _ = forward(params, tokens_BT, cfg, segment_ids_BT=segment_ids_BT)
    return logits_BTV, aux


def decode_init(params: dict[str, Any], cfg: Any, batch_size: int, max_len: int) -> Any:
    """An empty incremental-decode cache for ``batch_size`` rows and up to ``max_len`` tokens (a
    pytree of arrays; for the scaffold's families the layout of :mod:`jscale.models.decode`)."""
    return family_of(cfg).decode_init(params, cfg, batch_size, max_len)


def decode_step(params: dict[str, Any], token_B: Array, cache: Any, cfg: Any, *,
                model_state: Any = None) -> tuple[Array, Any]:
    """One token per row after those ``cache`` holds → ``(logits_BV float32, advanced cache)``.
    Jittable with the cache donated (``jax.jit(..., donate_argnums=2)``); ``model_state`` (``None``:
    the initial state) is read, not updated. Past the cache's capacity a scaffold family returns NaN
    logits under ``jit`` and raises outside it."""
    return family_of(cfg).decode_step(params, token_B, cache, cfg, model_state=model_state)


def generate(params: dict[str, Any], prompt_BT: Array, cfg: Any, n_new: int, *,
             max_len: int | None = None, model_state: Any = None) -> tuple[Array, Array]:
    """Greedy decoding, one compiled program: the prompt fed token by token from
    :func:`decode_init`, then ``n_new`` tokens, each the argmax of the logits after the one before.
    Returns ``(new_BT int32 [B, n_new], logits_BTV float32 [B, n_new, V])``: the new tokens and the
    logits each was chosen from. ``max_len`` (default: prompt + ``n_new``) is the cache's capacity;
    a prompt and ``n_new`` that do not fit raise here."""
    B, T = prompt_BT.shape
    if T < 1 or n_new < 1:
        raise ValueError(f"generate: the prompt ({T} tokens) and n_new={n_new} must be >= 1")
    max_len = T + n_new if max_len is None else max_len
    if T + n_new > max_len:
        raise ValueError(f"generate: a {T}-token prompt and n_new={n_new} tokens need a cache of "
                         f"{T + n_new} tokens; max_len={max_len}")
    return _jitted_generate(family_of(cfg))(params, jnp.asarray(prompt_BT, jnp.int32), model_state,
                                            cfg, n_new, max_len)


@functools.cache
def _jitted_generate(family: Family):
    def run(params, prompt_BT, model_state, cfg, n_new, max_len):
        def step(cache, token_B):
            logits_BV, cache = family.decode_step(params, token_B, cache, cfg,
                                                  model_state=model_state)
            return cache, logits_BV

        cache = family.decode_init(params, cfg, prompt_BT.shape[0], max_len)
        cache, logits_TBV = jax.lax.scan(step, cache, prompt_BT.T)

        def pick(carry, _):
            cache, logits_BV = carry
            token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
            cache, next_BV = step(cache, token_B)
            return (cache, next_BV), (token_B, logits_BV)
        # The last step feeds the last new token (its logits unused): the cache ends holding all.
        _, (new_TB, logits_TBV) = jax.lax.scan(pick, (cache, logits_TBV[-1]), None, length=n_new)
        return new_TB.T, logits_TBV.transpose(1, 0, 2)
    return jax.jit(run, static_argnums=(3, 4, 5))


def count_params(cfg: Any) -> dict[str, int]:
    """Analytic parameter count ``{"total", "non_embedding", "embedding", "with_head", "active"}``."""
    return family_of(cfg).count_params(cfg)


def flops_per_token(cfg: Any, seq_len: int) -> dict[str, float]:
    """Model FLOPs per token ``{"forward", "training"}``; see the family's docstring for conventions."""
    return family_of(cfg).flops_per_token(cfg, seq_len)


def scale_init(params: dict[str, Any], init_scale: Array, cfg: Any) -> dict[str, Any]:
    """Parameters initialized with ``init_scale=1`` → as if initialized with ``init_scale``, which may
    be a traced array (how a sweep varies the init scale per run without recompiling)."""
    return family_of(cfg).scale_init(params, init_scale, cfg)


def shape_for_params(n_params: float, base_model: Any, **kwargs: Any) -> Any:
    """``base_model``'s family's config with about ``n_params`` parameters (see
    :func:`jscale.models.sizing.shape_for_params` for the rule and the keywords)."""
    return family_of(base_model).shape_for_params(n_params, base_model, **kwargs)


def memory_bytes(cfg: Any, batch_size: int, seq_len: int) -> int:
    """Rough per-run device footprint of training ``cfg`` at this batch size and length."""
    return family_of(cfg).memory_bytes(cfg, batch_size, seq_len)


def max_seq_len(cfg: Any) -> int | None:
    """The longest sequence the model takes (``None``: unbounded)."""
    return family_of(cfg).max_seq_len(cfg)


def describe(cfg: Any) -> str:
    """A one-line shape summary of ``cfg``."""
    return family_of(cfg).describe(cfg)


def dim_fields(cfg: Any) -> dict[str, str]:
    """Logical dim → the config field behind it, for mesh error messages."""
    return family_of(cfg).dim_fields(cfg)


def init_scale(cfg: Any) -> float:
    """The init scale ``cfg`` asks for."""
    return family_of(cfg).init_scale(cfg)


def family_flops_per_token(base_model: Any, seq_len: int, *, n_min: float = 1e4,
                           n_max: float = 1e9, points: int = 25) -> Callable[[np.ndarray],
                                                                               np.ndarray]:
    """Training FLOPs per token of ``base_model``'s family as a function of its **non-embedding**
    parameter count: models shaped by :func:`shape_for_params` at ``points`` sizes between ``n_min``
    and ``n_max``, their exact counts and :func:`flops_per_token`, interpolated log-log (and
    extrapolated with the end segments' slopes)."""
    table = sizing.flops_table(family_of(base_model), base_model, seq_len, float(n_min),
                               float(n_max), int(points))
    return interpolated_flops_per_token(*table)
