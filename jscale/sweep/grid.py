"""Generating grids of runs: Cartesian products, paired axes, IsoFLOP sets (sized by the family's
shape rule, :func:`jscale.models.shape_for_params`, re-exported here).

Every function returns a list whose items are :class:`~jscale.config.RunConfig` — or
:class:`InvalidRun` for a combination that fails validation (say ``n_heads`` not dividing ``d_model``),
so one impossible point is reported in the results as failed instead of aborting the whole grid.
Each run is recognised everywhere by :func:`run_id`, a hash of its resolved config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jscale import models
from jscale.config import ConfigError, RunConfig, parse_overrides
from jscale.models import shape_for_params

__all__ = ["ISOFLOP_RTOL", "PLACEMENT_FIELDS", "InvalidRun", "isoflop", "product", "run_id",
           "shape_for_params", "zip_"]

#: ``isoflop`` keeps a size only if its whole-step FLOPs land within this fraction of the budget.
ISOFLOP_RTOL = 0.05


@dataclasses.dataclass(frozen=True)
class InvalidRun:
    """A grid point whose config could not be built; ``sweep.run`` records it as failed."""

    base: RunConfig
    overrides: tuple[tuple[str, Any], ...]
    error: str

    @property
    def run_id(self) -> str:
        """Stable id of (base config, overrides)."""
        return _digest({"base": _without_placement(self.base.to_dict()),
                        "overrides": [list(kv) for kv in self.overrides if not _is_placement(kv[0])]})


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


#: Config fields that say *where* a run runs or caches, not *what* it computes: :func:`run_id`
#: ignores them, so a sweep rerun on another mesh (or with another cache directory) skips the runs it
#: already finished, as ``jscale train`` resumes a run across meshes. An entry is a whole section
#: (``"mesh"``: every axis) or one dotted field. A sharded run computes the same math as an
#: unsharded one up to the order of float32 sums (``SHARDED_VS_SINGLE_LOSS`` in the tests).
PLACEMENT_FIELDS: tuple[str, ...] = ("mesh", "data.cache_dir")


def _is_placement(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in PLACEMENT_FIELDS)


def _without_placement(d: dict[str, Any]) -> dict[str, Any]:
    """A :meth:`RunConfig.to_dict` dict with the :data:`PLACEMENT_FIELDS` removed."""
    return {section: {k: v for k, v in fields.items() if not _is_placement(f"{section}.{k}")}
            for section, fields in d.items() if not _is_placement(section)}


def run_id(cfg: RunConfig | InvalidRun) -> str:
    """A 12-hex-digit id derived from the resolved config: the same run has the same id in any script
    or rerun; any field that differs gives a different id — except :data:`PLACEMENT_FIELDS` (the
    mesh, the cache directory), which say where a run runs, not what it computes."""
    if isinstance(cfg, InvalidRun):
        return cfg.run_id
    return _digest(_without_placement(cfg.to_dict()))


def _build(base: RunConfig, overrides: Mapping[str, Any]) -> RunConfig | InvalidRun:
    try:
        return base.override(overrides)
    except ConfigError as e:
        return InvalidRun(base, tuple(overrides.items()), str(e))


def product(base: RunConfig, **axes: Sequence[Any]) -> list[RunConfig | InvalidRun]:
    """Cartesian product over dotted config keys, the last axis varying fastest::

        product(base, **{"model.d_model": [64, 128], "optim.lr": [1e-3, 3e-3], "train.seed": [0, 1]})

    returns 8 runs. Unknown keys raise :class:`ConfigError` at once (a typo is not a grid point),
    also those in a ``growth.source`` axis's overrides. A grown run (``growth.*`` axes) whose source
    cannot be built is an :class:`InvalidRun` whose error names the field.
    """
    _check_keys(base, axes)
    keys = list(axes)
    return [_build(base, dict(zip(keys, values, strict=True)))
            for values in itertools.product(*(axes[k] for k in keys))]


def zip_(base: RunConfig, **axes: Sequence[Any]) -> list[RunConfig | InvalidRun]:
    """Paired axes: the i-th run takes the i-th value of every axis (all axes the same length)."""
    _check_keys(base, axes)
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"zip_: every axis must have the same length (got {lengths})")
    keys = list(axes)
    return [_build(base, dict(zip(keys, values, strict=True)))
            for values in zip(*(axes[k] for k in keys), strict=True)]


def _check_keys(base: RunConfig, axes: Mapping[str, Any]) -> None:
    base.check_keys(axes)  # the keys override accepts, nested ones included
    for value in axes.get("growth.source", ()):  # a grown run's source overrides: typos too
        if isinstance(value, str):  # one string: parsed (and checked) as the run is built
            continue
        try:
            base.check_keys(parse_overrides(list(value or ())))
        except ConfigError as e:
            raise ConfigError(f"growth.source: {e}") from None


# ---------------------------------------------------------------------------------------------------
# IsoFLOP


def isoflop(base: RunConfig, budgets: Iterable[float], *, n_params: Sequence[float] | None = None,
            sizes: Sequence[Mapping[str, Any]] | None = None, n_sizes: int = 7,
            span: float = 8.0, tokens_per_param: float = 20.0, min_steps: int = 10,
            rtol: float = ISOFLOP_RTOL, count: str = "non_embedding",
            **shape_kwargs: Any) -> list[RunConfig | InvalidRun]:
    """For each compute budget C (training FLOPs), a set of model sizes across the IsoFLOP valley,
    each trained for the number of steps that spends C.

    Sizes come from (in order of precedence) ``sizes`` — explicit model overrides such as
    ``{"model.d_model": 128, "model.n_layers": 2}`` —, ``n_params`` — target parameter counts (of
    kind ``count``, default non-embedding) turned into shapes by :func:`shape_for_params` (which also
    takes ``shape_kwargs``: ``aspect_ratio``, ``head_dim``, …) —, or, by default, ``n_sizes`` counts spaced
    log-uniformly over a factor ``span`` around the Chinchilla-style optimum ``N* = sqrt(C / (6 ·
    tokens_per_param))`` (``n_sizes=1``: N* alone; ``n_sizes < 1`` raises :class:`ConfigError`).
    A run's ``train.steps`` is ``round(C / (flops_per_token(cfg, T)["training"] · B · T))``; it is
    kept only if those whole steps spend C within ``rtol`` and number at least ``min_steps`` (sizes
    too big or too small for a budget are dropped). Each run records its budget in
    ``train.flops_budget``.
    """
    if n_sizes < 1:
        raise ConfigError(f"isoflop: n_sizes must be >= 1 (got {n_sizes})")
    out: list[RunConfig | InvalidRun] = []
    B, T = base.train.batch_size, base.train.seq_len
    for budget in budgets:
        if sizes is not None:
            candidates = [_build(base, s) for s in sizes]
        else:
            if n_params is not None:
                targets = list(n_params)
            else:
                n_star = math.sqrt(budget / (6 * tokens_per_param))
                targets = ([n_star] if n_sizes == 1 else
                           [n_star * span ** (i / (n_sizes - 1) - 0.5) for i in range(n_sizes)])
            candidates = []
            for target in targets:
                shape = shape_for_params(target, base.model, count=count, **shape_kwargs)
                candidates.append(_build(base, {f"model.{k}": v for k, v in
                                                dataclasses.asdict(shape).items()}))
        seen = set()
        for cand in candidates:
            if isinstance(cand, InvalidRun):
                out.append(cand)
                continue
            per_step = models.flops_per_token(cand.model, T)["training"] * B * T
            steps = round(budget / per_step)
            if steps < min_steps or abs(steps * per_step - budget) > rtol * budget:
                continue
            run = cand.override({"train.steps": steps, "train.flops_budget": float(budget)})
            if (rid := run_id(run)) not in seen:
                seen.add(rid)
                out.append(run)
    return out
