"""The text form of one growth step (``jscale train --grow``): :func:`parse_spec` reads it into a
:class:`GrowthSpec`, which checks a pair of configs against what it says before
:func:`jscale.growth.grow` runs.

Grammar: ``OP[:G[:PLACEMENT]]``.

* ``OP`` — an operator of :data:`jscale.growth.OPERATORS`.
* ``G`` — the depth factor, an integer ≥ 2: the grown model has ``G`` times the source's layers.
  Required by the depth operators (``stack:4``, ``interpolate:2``), refused by the width operators
  (``direct_width``), and for the operators that grow either (``zero``, ``random``, ``learn``)
  it decides: ``zero:2`` grows the depth, ``zero`` the width. Width factors come from the two
  configs, not from the text.
  ``direct_width:G`` names the d_model factor, checked against the configs
  (``direct_width:2``). ``zero_depth:G`` and ``zero_width`` spell ``zero:G`` and ``zero`` out.
* ``PLACEMENT`` — zero depth growth only: ``interleave`` (the default) or ``end``
  (:data:`jscale.growth.PLACEMENTS`), e.g. ``zero:2:end``.

The text is canonical (:meth:`GrowthSpec.__str__`): ``zero:2:interleave`` reads as ``zero:2``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jscale import models, registry
from jscale.config import ConfigError, check
from jscale.growth.checks import check_depth, check_pair, check_width
from jscale.growth.index import model_spec
from jscale.growth.ops import OPERATORS
from jscale.growth.plans import PLACEMENTS

#: The grammar, in one line (for ``--help`` and error messages).
GRAMMAR = "OP[:G[:PLACEMENT]]"
#: Spellings that say which way ``zero`` grows: ``zero_depth:G`` is ``zero:G``, ``zero_width``
#: is ``zero``.
ALIASES = {"zero_depth": ("zero", "depth"), "zero_width": ("zero", "width")}


@dataclasses.dataclass(frozen=True)
class GrowthSpec:
    """One growth step: operator ``op``, depth factor ``factor`` (``None``: width growth, the
    factors given by the configs), for ``direct_width:G`` the ``d_model`` factor ``width_factor``
    it checks, and for zero depth growth ``placement``."""

    op: str
    factor: int | None = None
    placement: str | None = None
    width_factor: int | None = None

    def __str__(self) -> str:
        g = self.factor if self.factor is not None else self.width_factor
        text = self.op if g is None else f"{self.op}:{g}"
        return text if self.placement in (None, PLACEMENTS[0]) else f"{text}:{self.placement}"

    @property
    def grows(self) -> str:
        """``"depth"`` or ``"width"``."""
        return "width" if self.factor is None else "depth"

    @property
    def options(self) -> dict[str, Any]:
        """The keyword options for :func:`jscale.growth.grow`."""
        return {} if self.placement is None else {"placement": self.placement}

    def check(self, cfg_small: Any, cfg_big: Any, *, field: str = "--grow") -> None:
        """Refuse (:class:`~jscale.config.ConfigError` naming ``field`` and both models' shapes) a
        ``cfg_big`` whose depth is not what this step makes from ``cfg_small``: ``factor`` × the
        layers for depth growth, the same layers for width growth. (What else the operator
        needs — the other fields unchanged, widths that only grow — :func:`jscale.growth.grow`
        checks, naming the model field.)"""
        check_pair(cfg_small, cfg_big, self.op)
        if self.width_factor is not None:
            d, e = model_spec(cfg_small).d_model, model_spec(cfg_big).d_model
            if e != self.width_factor * d:
                raise ConfigError(f"{field}: {str(self)!r} makes d_model {self.width_factor} × {d} "
                                  f"= {self.width_factor * d} from the source's {d}, but this "
                                  f"run's model has {e} (source: {models.describe(cfg_small)}; "
                                  f"this run: {models.describe(cfg_big)})")
        n, m = model_spec(cfg_small).n_layers, model_spec(cfg_big).n_layers
        want = n if self.factor is None else self.factor * n
        if m != want:
            how = (f"grows the width (write {self.op}:G to grow the depth), so it keeps the "
                   f"source's {n} layers" if self.factor is None
                   else f"makes {self.factor} × {n} = {want} layers from the source's {n}")
            raise ConfigError(f"{field}: {str(self)!r} {how}, but this run's model has {m} "
                              f"(source: {models.describe(cfg_small)}; this run: "
                              f"{models.describe(cfg_big)})")


def parse_spec(text: str, *, field: str = "--grow") -> GrowthSpec:
    """``text`` (the module docstring's grammar) as a :class:`GrowthSpec`; a
    :class:`~jscale.config.ConfigError` naming ``field`` for an unknown or unbuilt operator, a
    missing, extra or bad ``G``, or a bad placement."""
    op, *rest = text.strip().split(":")
    if op in ALIASES:
        op, kind = ALIASES[op]
        if kind == "depth" and not rest:
            raise ConfigError(f"{field}: {text!r} grows the depth: write {text}:G, G the depth "
                              "factor (an integer >= 2)")
        if kind == "width" and rest:
            raise ConfigError(f"{field}: {text.split(':')[0]!r} grows the width, by factors the "
                              f"configs give: write it with no :G (got {text!r})")
    if op not in OPERATORS:
        raise ConfigError(f"{field}: unknown growth operator {op!r} in {text!r}; "
                          f"{GRAMMAR} with OP one of {', '.join(built())}")
    found = OPERATORS[op]
    if not found.supported:
        raise ConfigError(f"{field}: growth operator {op!r} is not built yet ({found.note}); "
                          f"built: {', '.join(built())}")
    if len(rest) > 2:
        raise ConfigError(f"{field}: {text!r} has {len(rest)} ':' fields; the grammar is {GRAMMAR}")
    if not rest:
        if found.grows == "depth":
            raise ConfigError(f"{field}: {op!r} grows the depth: write {op}:G, G the depth factor "
                              "(an integer >= 2)")
        return GrowthSpec(op)
    g = rest[0]
    if "depth" not in found.grows:  # direct_width:G — G the d_model factor, checked
        if len(rest) > 1 or not (g.isdigit() and int(g) >= 2):
            raise ConfigError(f"{field}: {op!r} grows the width; {op}:G names the d_model factor, "
                              f"an integer >= 2 (the configs give the other widths; got {text!r})")
        return GrowthSpec(op, width_factor=int(g))
    if not (g.isdigit() and int(g) >= 2):
        raise ConfigError(f"{field}: the depth factor G must be an integer >= 2 (got {g!r} in "
                          f"{text!r})")
    placement = rest[1] if len(rest) == 2 else None
    if placement is not None and (op != "zero" or placement not in PLACEMENTS):
        raise ConfigError(f"{field}: a placement ({placement!r} in {text!r}) is for zero depth "
                          f"growth only, one of {', '.join(PLACEMENTS)}")
    if op == "zero" and placement is None:
        placement = PLACEMENTS[0]
    return GrowthSpec(op, int(g), placement)


def built() -> list[str]:
    """The operators :func:`parse_spec` accepts (the implemented ones of the table)."""
    return [name for name, op in OPERATORS.items() if op.supported]


def grammar_help() -> str:
    """A paragraph for ``--help``: the grammar and every operator of the table, from the table."""
    ops = "; ".join(f"{name} ({op.grows}{'' if op.supported else ', not built yet'})"
                    for name, op in OPERATORS.items())
    return (f"{GRAMMAR}: G is the depth factor, an integer >= 2 (stack:4, interpolate:2, zero:2 "
            f"= zero_depth:2, random:2, learn:2); width growth takes the widths from the configs "
            f"(zero = zero_width, random, learn, direct_width; direct_width:2 also checks that "
            f"d_model doubles); "
            f"PLACEMENT, for zero depth growth: {' or '.join(PLACEMENTS)} (default "
            f"{PLACEMENTS[0]}). Operators: {ops}")


@registry.register_growth_check
def check_run(cfg: Any) -> None:
    """Refuse (:class:`~jscale.config.ConfigError` naming the ``growth.*`` field) a run config whose
    growth section cannot work: ``growth.op`` outside the grammar, the per-operator fields given to
    another operator, ``grow_steps`` past the run, or a source — :meth:`RunConfig.source_config` —
    the operator cannot grow into this run's model. :class:`~jscale.config.RunConfig` calls it
    through the registry (the config sits below the growth operators)."""
    g = cfg.growth
    step = parse_spec(g.op, field="growth.op")
    check(g.grow_steps == 0 or step.op == "random", "growth.grow_steps",
          f"blends new parameters in for the 'random' operator only (growth.op={g.op!r})",
          g.grow_steps)
    check(g.grow_steps <= cfg.train.steps, "growth.grow_steps",
          f"must be <= train.steps={cfg.train.steps} (the blend must end within the run)",
          g.grow_steps)
    check(g.learn_steps is None or step.op == "learn", "growth.learn_steps",
          f"trains the LiGO expansion of the 'learn' operator only (growth.op={g.op!r})",
          g.learn_steps)
    check(not (g.grow_optimizer_state and step.op == "learn"), "growth.grow_optimizer_state",
          "'learn' has no fixed index maps to grow the moments with; start a fresh optimizer")
    source = cfg.source_config().model
    step.check(source, cfg.model, field="growth.op")
    try:
        (check_width if step.factor is None else check_depth)(source, cfg.model, step.op)
    except ConfigError as e:
        raise ConfigError(f"growth.op: {g.op!r} cannot grow the source this section describes "
                          f"into this run's model: {e}") from None
