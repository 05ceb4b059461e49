"""Generating grids of runs: Cartesian products, paired axes, IsoFLOP sets, and a shape rule.

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
from jscale.config import ConfigError, RunConfig

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

    returns 8 runs. Unknown keys raise :class:`ConfigError` at once (a typo is not a grid point).
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


# ---------------------------------------------------------------------------------------------------
# shape rule


def shape_for_params(n_params: float, base_model: Any, *, aspect_ratio: float = 64.0,
                     head_dim: int | None = None, ffn_ratio: float | None = None,
                     max_layers: int = 64, count_rtol: float = 0.2,
                     count: str = "non_embedding", min_layers: int = 1) -> Any:
    """The model config of ``base_model``'s family with about ``n_params`` parameters (by default
    **non-embedding**; see ``count``), under a fixed shape rule:

    * ``n_heads = d_model / head_dim`` (default: ``base_model``'s head dim) and ``n_kv_heads`` keeps
      ``base_model``'s query heads per kv head exactly — so ``d_model`` is a multiple of ``head_dim ×
      (n_heads / n_kv_heads)``, and every size has the same attention (MHA stays MHA, GQA-2 stays
      GQA-2); ``d_ff = ffn_ratio · d_model`` rounded up to a multiple of 8 (default: ``base_model``'s
      ratio);
    * for each depth ``n_layers`` in ``min_layers..max_layers`` the width whose count is closest to
      ``n_params`` is found; among the depths whose count is within ``count_rtol`` of the best
      achievable one, the one whose ``d_model / n_layers`` is closest to ``aspect_ratio`` wins
      (Kaplan et al.'s depth/width ratio; the built-in presets use 64).

    ``count`` names the parameter count that is matched: ``"non_embedding"`` (Kaplan et al.'s N),
    ``"with_head"`` (plus the V×D output head, the N that ``C = 6ND`` counts) or ``"total"``; the exact
    count of the result is ``jscale.count_params(cfg)[count]``. Fields a family lacks (e.g.
    ``n_heads``) are left alone.
    """
    if n_params <= 0:
        raise ConfigError(f"shape_for_params: n_params must be > 0 (got {n_params})")
    if count not in ("non_embedding", "with_head", "total"):
        raise ConfigError(f"shape_for_params: count must be 'non_embedding', 'with_head' or 'total' "
                          f"(got {count!r})")
    fields = {f.name for f in dataclasses.fields(base_model)}
    k = head_dim or getattr(base_model, "k", None) or 64
    ratio = ffn_ratio or (base_model.d_ff / base_model.d_model if "d_ff" in fields else None)
    q_per_kv = (base_model.n_heads // base_model.n_kv_heads
                if {"n_heads", "n_kv_heads"} <= fields else 1)

    def shaped(n_layers: int, d_model: int):
        change: dict[str, Any] = {"n_layers": n_layers, "d_model": d_model}
        if "n_heads" in fields:
            n_heads = d_model // k
            change["n_heads"] = n_heads
            if "head_dim" in fields:
                change["head_dim"] = None if k * n_heads == d_model else k
            if "n_kv_heads" in fields:
                change["n_kv_heads"] = n_heads // q_per_kv
        if ratio is not None:
            change["d_ff"] = 8 * math.ceil(ratio * d_model / 8)
        cfg = dataclasses.replace(base_model, **change)
        return cfg, abs(math.log(models.count_params(cfg)[count] / n_params))

    per_depth = []  # (count error, aspect error, cfg) of the best width at each depth
    if not 1 <= min_layers <= max_layers:
        raise ConfigError(f"shape_for_params: need 1 <= min_layers <= max_layers (got {min_layers}, "
                          f"{max_layers})")
    for n_layers in range(min_layers, max_layers + 1):
        best, m = None, 1
        while True:
            cfg, err = shaped(n_layers, m * k * q_per_kv)
            if best is not None and err > best[1]:
                break  # the count grows with width: past the closest one
            best, m = (cfg, err), m + 1
        cfg, err = best
        per_depth.append((err, abs(math.log(cfg.d_model / (aspect_ratio * n_layers))), cfg))
    floor = min(e for e, _, _ in per_depth)
    near = [p for p in per_depth if p[0] <= floor + math.log1p(count_rtol)]
    return min(near, key=lambda p: p[1])[2]


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
