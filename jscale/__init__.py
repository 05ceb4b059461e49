"""jscale: a JAX framework for scaling-law research.

Models are pure functions over parameter pytrees (``init`` / ``apply``), configs are frozen dataclasses
composed into a :class:`RunConfig`, and :func:`train` runs one configuration end to end.
"""

from jscale import presets
from jscale.config import ConfigError, DataConfig, MeshConfig, OptimConfig, RunConfig, TrainConfig
from jscale.models import apply, count_params, flops_per_token, init
from jscale.models.mamba import MambaConfig
from jscale.models.transformer import TransformerConfig

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataConfig", "MambaConfig", "MeshConfig", "OptimConfig", "RunConfig",
    "TrainConfig", "TransformerConfig", "apply", "count_params", "flops_per_token", "init",
    "presets",
]
