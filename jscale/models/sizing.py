"""Sizing models by parameter count: the depth/width search behind ``shape_for_params``, and FLOPs per
token as a function of the parameter count (``family_flops_per_token``).

A family supplies one step, ``shape_step(base_model, *, head_dim, ffn_ratio) -> (width_step,
shaped)``: ``d_model`` is searched over multiples of ``width_step``, and ``shaped(n_layers, d_model)``
is the family's config at that depth and width. Everything else here is the same for every family.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from jscale.configpath import ConfigError

COUNTS = ("non_embedding", "with_head", "total")


def shape_for_params(family: Any, n_params: float, base_model: Any, *, aspect_ratio: float = 64.0,
                     head_dim: int | None = None, ffn_ratio: float | None = None,
                     max_layers: int = 64, count_rtol: float = 0.2,
                     count: str = "non_embedding", min_layers: int = 1) -> Any:
    """The model config of ``base_model``'s family with about ``n_params`` parameters (by default
    **non-embedding**; see ``count``), under a fixed shape rule:

    * the family's step fixes everything but depth and width (the transformer: ``n_heads = d_model /
      head_dim``, ``n_kv_heads`` keeping ``base_model``'s query heads per kv head, ``d_ff =
      ffn_ratio · d_model`` rounded up to a multiple of 8; Mamba: only ``n_layers`` and ``d_model``)
      and the width grid (multiples of ``head_dim × query heads per kv head``; Mamba: of ``head_dim``,
      default 64);
    * for each depth ``n_layers`` in ``min_layers..max_layers`` the width whose count is closest to
      ``n_params`` is found; among the depths whose count is within ``count_rtol`` of the best
      achievable one, the one whose ``d_model / n_layers`` is closest to ``aspect_ratio`` wins
      (Kaplan et al.'s depth/width ratio; the built-in presets use 64).

    ``count`` names the parameter count that is matched: ``"non_embedding"`` (Kaplan et al.'s N),
    ``"with_head"`` (plus the V×D output head, the N that ``C = 6ND`` counts) or ``"total"``; the
    exact count of the result is ``family.count_params(cfg)[count]``.
    """
    if n_params <= 0:
        raise ConfigError(f"shape_for_params: n_params must be > 0 (got {n_params})")
    if count not in COUNTS:
        raise ConfigError(f"shape_for_params: count must be 'non_embedding', 'with_head' or 'total' "
                          f"(got {count!r})")
    width_step, shaped = family.shape_step(base_model, head_dim=head_dim, ffn_ratio=ffn_ratio)

    def candidate(n_layers: int, d_model: int):
        cfg = shaped(n_layers, d_model)
        return cfg, abs(math.log(family.count_params(cfg)[count] / n_params))

    per_depth = []  # (count error, aspect error, cfg) of the best width at each depth
    if not 1 <= min_layers <= max_layers:
        raise ConfigError(f"shape_for_params: need 1 <= min_layers <= max_layers (got {min_layers}, "
                          f"{max_layers})")
    for n_layers in range(min_layers, max_layers + 1):
        best, m = None, 1
        while True:
            cfg, err = candidate(n_layers, m * width_step)
            if best is not None and err > best[1]:
                break  # the count grows with width: past the closest one
            best, m = (cfg, err), m + 1
        cfg, err = best
        per_depth.append((err, abs(math.log(cfg.d_model / (aspect_ratio * n_layers))), cfg))
    floor = min(e for e, _, _ in per_depth)
    near = [p for p in per_depth if p[0] <= floor + math.log1p(count_rtol)]
    return min(near, key=lambda p: p[1])[2]


@functools.lru_cache(maxsize=16)
def flops_table(family: Any, base_model: Any, seq_len: int, n_min: float, n_max: float,
                points: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``(N, F)``: non-embedding counts and training FLOPs per token of ``family``'s models shaped by
    :func:`shape_for_params` at ``points`` sizes log-spaced between ``n_min`` and ``n_max``."""
    N, F = [], []
    for target in np.geomspace(n_min, n_max, points):
        cfg = shape_for_params(family, float(target), base_model)
        N.append(family.count_params(cfg)["non_embedding"])
        F.append(family.flops_per_token(cfg, seq_len)["training"])
    return tuple(N), tuple(F)
