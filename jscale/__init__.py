"""jscale: a JAX framework for scaling-law research.

Models are pure functions over parameter pytrees (``init`` / ``apply``), configs are frozen dataclasses
composed into a :class:`RunConfig`, and :func:`train` runs one configuration end to end.

The names below are loaded on first use (PEP 562), so ``import jscale.laws`` (pure math on tables)
does not import the models, the sweeps or JAX's model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> (module, attribute; None: the module itself).
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "ConfigError": ("jscale.config", "ConfigError"),
    "DataConfig": ("jscale.config", "DataConfig"),
    "MeshConfig": ("jscale.config", "MeshConfig"),
    "OptimConfig": ("jscale.config", "OptimConfig"),
    "RunConfig": ("jscale.config", "RunConfig"),
    "TrainConfig": ("jscale.config", "TrainConfig"),
    "MambaConfig": ("jscale.models.mamba", "MambaConfig"),
    "TransformerConfig": ("jscale.models.transformer", "TransformerConfig"),
    "apply": ("jscale.models", "apply"),
    "count_params": ("jscale.models", "count_params"),
    "flops_per_token": ("jscale.models", "flops_per_token"),
    "init": ("jscale.models", "init"),
    "presets": ("jscale.presets", None),
}

__all__ = [
    "ConfigError", "DataConfig", "MambaConfig", "MeshConfig", "OptimConfig", "RunConfig",
    "TrainConfig", "TransformerConfig", "apply", "count_params", "flops_per_token", "init",
    "presets",
]

if TYPE_CHECKING:  # static tools see the names; at run time they load on first use
    from jscale import presets
    from jscale.config import ConfigError, DataConfig, MeshConfig, OptimConfig, RunConfig, TrainConfig
    from jscale.models import apply, count_params, flops_per_token, init
    from jscale.models.mamba import MambaConfig
    from jscale.models.transformer import TransformerConfig


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'jscale' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value          # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
