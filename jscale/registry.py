"""The one registry of model families: ``name -> family object`` (see :mod:`jscale.models.protocol`).

A family object has a ``name`` and a ``config_cls`` (its frozen config dataclass) and meets the
:class:`jscale.models.protocol.Family` contract. :func:`family_of` finds the family of a config
instance by its type; :func:`by_name` by the name ``RunConfig.to_dict`` writes (``model.family``).

The built-in families register themselves when their module is imported; a lookup that misses
imports them first (:data:`BUILTIN`), so ``RunConfig.from_dict`` works before anything imported
:mod:`jscale.models`, and :mod:`jscale.config` never imports the models. This module is the bottom
floor: it imports only :mod:`jscale.configpath`.
"""

from __future__ import annotations

import importlib
from typing import Any

from jscale.configpath import ConfigError

#: Built-in family name -> the module whose import registers it.
BUILTIN = {"transformer": "jscale.models.transformer", "mamba": "jscale.models.mamba",
           "parscale": "jscale.models.parscale"}

#: The module whose import registers the check of a ``RunConfig``'s growth section.
GROWTH_CHECK = "jscale.growth.spec"

_BY_NAME: dict[str, Any] = {}
_GROWTH_CHECK: list[Any] = []
_BY_CONFIG: dict[type, Any] = {}


def register(family: Any) -> Any:
    """Register ``family`` (an object with ``name`` and ``config_cls``); returns it. Registering
    another family under a taken name or config class replaces it."""
    old = _BY_NAME.pop(family.name, None)
    if old is not None:
        _BY_CONFIG.pop(old.config_cls, None)
    _BY_NAME[family.name] = family
    _BY_CONFIG[family.config_cls] = family
    return family


def unregister(name: str) -> None:
    """Remove the family ``name`` (tests register temporary families)."""
    family = _BY_NAME.pop(name)
    _BY_CONFIG.pop(family.config_cls, None)


def _load_builtins() -> None:
    for name, module in BUILTIN.items():
        if name not in _BY_NAME:
            importlib.import_module(module)


def names() -> list[str]:
    """The registered family names (built-ins included), sorted."""
    _load_builtins()
    return sorted(_BY_NAME)


def family_of(model_cfg: Any) -> Any:
    """The family of model config instance ``model_cfg`` (by its exact type)."""
    family = _BY_CONFIG.get(type(model_cfg))
    if family is None:
        _load_builtins()
        family = _BY_CONFIG.get(type(model_cfg))
    if family is None:
        raise ConfigError(f"model: {type(model_cfg).__name__} is not the config of a registered model "
                          f"family (registered: {names()})")
    return family


def by_name(name: str) -> Any:
    """The family registered as ``name``."""
    if name not in _BY_NAME:
        _load_builtins()
    if name not in _BY_NAME:
        raise ConfigError(f"model.family: unknown family {name!r} (registered: {names()})")
    return _BY_NAME[name]


def register_growth_check(fn: Any) -> Any:
    """Register ``fn(run_cfg)``, the check of a ``RunConfig``'s ``growth`` section (the growth
    operators live above the config; :mod:`jscale.growth.spec` registers it); returns it."""
    _GROWTH_CHECK[:] = [fn]
    return fn


def growth_check() -> Any:
    """The registered growth-section check (imports :data:`GROWTH_CHECK` first if needed)."""
    if not _GROWTH_CHECK:
        importlib.import_module(GROWTH_CHECK)
    return _GROWTH_CHECK[0]
