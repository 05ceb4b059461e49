"""Typed dotted paths into trees of frozen config dataclasses (the machinery behind ``RunConfig``).

A config is a tree: a frozen dataclass whose fields are leaves (ints, floats, strs, tuples, ...) or
sub-configs (dataclass instances, walked into). A dotted key names a path from the root,
``model.moe.n_experts``. The rules, used by :meth:`jscale.RunConfig.override` and friends:

* :func:`flatten` lists the leaves of every *present* sub-config; a sub-config field whose value is
  ``None`` (declared ``SubConfig | None``) is one leaf.
* :func:`accepts` also allows a key naming a sub-config field itself (set it to an instance, a
  mapping of its fields, or ``None``) and a key *under* a ``None`` optional sub-config
  (``model.moe.n_experts`` while ``model.moe`` is ``None``): :func:`apply` then builds that
  sub-config from its class defaults plus the keys given for it.
* :func:`apply` groups the keys by owner, coerces each value to its declared type (``typing``
  hints of the owning dataclass, via :func:`coerce`) and rebuilds every changed level with
  ``dataclasses.replace``, so each level's ``__post_init__`` validates the combined change once.
  A sub-config's error that names a field relative to itself (``"width: must be > 0"``) is
  re-raised with the full dotted path (``"model.sub.width: must be > 0"``).
* :func:`from_plain` rebuilds a dataclass tree from ``dataclasses.asdict`` output (after a JSON
  round trip: lists become tuples again), using the declared field types; unknown keys raise.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the constraint."""


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of dataclass ``cls``'s fields."""
    return typing.get_type_hints(cls)


def _init_fields(cls_or_obj: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls_or_obj) if f.init]


def _is_config(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _members(hint: Any) -> tuple[Any, ...]:
    """The members of a union hint, or ``(hint,)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def config_class(hint: Any) -> type | None:
    """The dataclass type declared by ``hint`` (``Sub`` or ``Sub | None``), else ``None``."""
    found = [h for h in _members(hint) if isinstance(h, type) and dataclasses.is_dataclass(h)]
    return found[0] if len(found) == 1 else None


def _field_default(cls: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"dotted.key": leaf}`` for every leaf of dataclass ``obj``, walking into present sub-configs."""
    out: dict[str, Any] = {}
    for f in _init_fields(obj):
        value, key = getattr(obj, f.name), _join(prefix, f.name)
        out.update(flatten(value, key) if _is_config(value) else {key: value})
    return out


def accepts(obj: Any, key: str) -> bool:
    """Whether :func:`apply` accepts dotted ``key`` on dataclass instance ``obj`` (see module doc)."""
    cls, parts = type(obj), key.split(".")
    for i, name in enumerate(parts):
        if cls is None or name not in {f.name for f in _init_fields(cls)}:
            return False
        if i == len(parts) - 1:
            return True
        value = getattr(obj, name) if obj is not None else _field_default(cls, name)
        if _is_config(value):
            obj, cls = value, type(value)
        elif value is None:
            obj, cls = None, config_class(field_hints(cls)[name])
        else:
            return False  # a leaf has no fields
    return False


_RELATIVE = re.compile(r"^([A-Za-z_]\w*)[.:]")


def _construct(build: typing.Callable[[], Any], cls: type, prefix: str) -> Any:
    """``build()``, turning its errors into :class:`ConfigError`\\ s that name the dotted path."""
    try:
        return build()
    except ConfigError as e:
        match = _RELATIVE.match(str(e))
        if prefix and match and match[1] in {f.name for f in _init_fields(cls)}:
            raise ConfigError(f"{prefix}.{e}") from None  # the field named relative to its config
        raise
    except TypeError as e:  # a required field missing
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def apply(obj: Any, updates: Mapping[str, Any], prefix: str = "", cls: type | None = None) -> Any:
    """A copy of dataclass ``obj`` with dotted ``updates`` (relative to ``obj``) coerced and applied.

    ``obj`` may be ``None`` with ``cls`` given: the result is then ``cls`` built from its defaults plus
    ``updates``. Keys must pass :func:`accepts` (checked by the caller, which knows how to list the
    valid ones); ``prefix`` is ``obj``'s own dotted path, for error messages.
    """
    cls = type(obj) if obj is not None else cls
    hints, direct, nested = field_hints(cls), {}, {}
    for key, value in updates.items():
        name, _, rest = key.partition(".")
        if rest:
            nested.setdefault(name, {})[rest] = value
        else:
            direct[name] = value
    changes = {}
    for name, value in direct.items():
        key = _join(prefix, name)
        if name in nested:
            raise ConfigError(f"{key}: set both as a whole and by its fields "
                              f"({', '.join(f'{key}.{k}' for k in nested[name])})")
        changes[name] = coerce(value, hints[name], key)
    for name, sub in nested.items():
        current = getattr(obj, name) if obj is not None else _field_default(cls, name)
        sub_cls = type(current) if _is_config(current) else config_class(hints[name])
        changes[name] = apply(current, sub, _join(prefix, name), sub_cls)
    if obj is not None:
        return _construct(lambda: dataclasses.replace(obj, **changes), cls, prefix)
    return _construct(lambda: cls(**changes), cls, prefix)


def from_plain(cls: type, d: Any, prefix: str) -> Any:
    """Dataclass ``cls`` rebuilt from ``d``, a ``dataclasses.asdict``-style mapping (JSON lists become
    tuples, nested mappings sub-configs, by the declared field types); unknown keys raise naming them."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of {cls.__name__} fields (got {d!r})")
    hints, names = field_hints(cls), [f.name for f in _init_fields(cls)]
    for key in d:
        if key not in names:
            raise ConfigError(f"{_join(prefix, key)}: unknown field of {cls.__name__} "
                              f"(fields: {', '.join(names)})")
    values = {k: _from_plain_value(v, hints[k], _join(prefix, k)) for k, v in d.items()}
    return _construct(lambda: cls(**values), cls, prefix)


def _from_plain_value(value: Any, hint: Any, key: str) -> Any:
    for member in _members(hint):
        if isinstance(member, type) and dataclasses.is_dataclass(member) and isinstance(value, Mapping):
            return from_plain(member, value, key)
        if typing.get_origin(member) is tuple and isinstance(value, list | tuple):
            elems = _tuple_items(member, len(value), key, value)
            return tuple(_from_plain_value(v, h, f"{key}[{i}]")
                         for i, (v, h) in enumerate(zip(value, elems, strict=True)))
    return value


def _tuple_items(hint: Any, n: int, key: str, value: Any) -> list[Any]:
    """The element hints of tuple ``hint`` for ``n`` items; raise naming ``key`` on a wrong length."""
    args = typing.get_args(hint)
    if not args:
        return [Any] * n
    if len(args) == 2 and args[1] is Ellipsis:
        return [args[0]] * n
    if len(args) != n:
        raise ConfigError(f"{key}: must have {len(args)} items ({hint}) (got {value!r})")
    return list(args)


def _split_sequence(text: str) -> list[str]:
    """``"1,2"``, ``"(1, 2)"``, ``"[a, 'b']"``, ``"(1,)"``, ``"[]"`` -> the item strings."""
    s = text.strip()
    if len(s) >= 2 and (s[0], s[-1]) in (("(", ")"), ("[", "]")):
        s = s[1:-1].strip()
    if not s:
        return []
    items = [item.strip() for item in s.split(",")]
    if len(items) > 1 and items[-1] == "":
        items.pop()  # a trailing comma: "(1,)"
    return [i[1:-1] if len(i) >= 2 and i[0] == i[-1] and i[0] in "'\"" else i for i in items]


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` (a Python value or a CLI string) to type ``hint``; raise naming ``key``.

    Handles ``bool``/``int``/``float``/``str``, ``Literal``, unions (``X | None``: ``"none"`` and
    ``"null"`` are ``None``), tuples (``tuple[int, ...]``, ``tuple[int, str]``; from a sequence or a
    string ``"1,2"``, ``"(1, 2)"``, ``"[]"``), sub-config dataclasses (an instance or a mapping of its
    fields) and ``Any`` (passed through).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or
                                   (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: cannot convert {value!r} to {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)} (got {value!r})")
        return value
    if origin is tuple or hint is tuple:
        if isinstance(value, str):
            items = _split_sequence(value)
        elif isinstance(value, Sequence):
            items = list(value)
        else:
            raise ConfigError(f"{key}: must be a tuple ({hint}) (got {value!r})")
        elems = _tuple_items(hint, len(items), key, value)
        return tuple(coerce(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(items, elems, strict=True)))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return from_plain(hint, value, key)
        raise ConfigError(f"{key}: must be a {hint.__name__} or a mapping of its fields (got {value!r})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}: must be a bool (true/false) (got {value!r})")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be an int (got {value!r})")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: must be an int (got {value!r})") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: must be an int (got {value!r})")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be a float (got {value!r})")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: must be a float (got {value!r})") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a str (got {value!r})")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint}")
