"""Model families, dispatched on the config type.

Each family is one module exposing ``init(key, cfg)``, ``apply(params, tokens_BT, cfg, *,
segment_ids_BT=None) -> (logits_BTV, aux)``, ``count_params(cfg)``, ``flops_per_token(cfg,
seq_len)`` and ``scale_init(params, init_scale)``, plus its frozen config class.
Registering the module here is all a new family needs.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import jax

from jscale.config import ConfigError, register_model_config
from jscale.models import mamba, transformer
from jscale.models.mamba import MambaConfig
from jscale.models.transformer import TransformerConfig

_FAMILIES: dict[type, types.ModuleType] = {}


def register(family: str, config_cls: type, module: types.ModuleType) -> None:
    """Register a model family: ``config_cls`` instances dispatch to ``module``'s functions."""
    _FAMILIES[config_cls] = module
    register_model_config(family, config_cls)


register("transformer", TransformerConfig, transformer)
register("mamba", MambaConfig, mamba)


def family_module(cfg: Any) -> types.ModuleType:
    """The module implementing ``cfg``'s model family."""
    try:
        return _FAMILIES[type(cfg)]
    except KeyError:
        raise ConfigError(f"model: no model family registered for {type(cfg).__name__} "
                          f"(registered: {[c.__name__ for c in _FAMILIES]})") from None


def init(key: jax.Array, cfg: Any) -> dict[str, Any]:
    """Initialize a parameter pytree (nested dict of arrays) for the model described by ``cfg``."""
    return _jitted_init(family_module(cfg))(key, cfg)


@functools.cache
def _jitted_init(module: types.ModuleType):
    # One compiled program per config instead of hundreds of eagerly dispatched ops.
    return jax.jit(module.init, static_argnums=1)


def apply(params: dict[str, Any], tokens_BT: jax.Array, cfg: Any, *,
          segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run the model: ``(logits_BTV, aux)``; ``aux`` holds auxiliary losses/metrics (may be empty)."""
    return family_module(cfg).apply(params, tokens_BT, cfg, segment_ids_BT=segment_ids_BT)


def count_params(cfg: Any) -> dict[str, int]:
    """Analytic parameter count ``{"total", "non_embedding", "embedding", "with_head"}``."""
    return family_module(cfg).count_params(cfg)


def flops_per_token(cfg: Any, seq_len: int, **kwargs) -> dict[str, float]:
    """Model FLOPs per token ``{"forward", "training"}``; see the family's docstring for conventions."""
    return family_module(cfg).flops_per_token(cfg, seq_len, **kwargs)


def scale_init(params: dict[str, Any], init_scale: jax.Array, cfg: Any) -> dict[str, Any]:
    """Parameters initialized with ``init_scale=1`` → as if initialized with ``init_scale``, which may
    be a traced array (how a sweep varies the init scale per run without recompiling)."""
    return family_module(cfg).scale_init(params, init_scale)
