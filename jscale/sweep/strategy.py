"""How ``strategy="auto"`` picks a strategy per chunk of a sweep group, and the compiled programs it
shares with the run.

The probe (:func:`probe_strategies`) times a few steps of each strategy, interleaved and repeated, compared by
:func:`decide_strategy`. ``"sequential"`` is the baseline — the plain un-batched step, the program a
single run compiles, one member's memory at a time — and ``"vmap"`` (one program over R members)
must beat it by more than the measured noise. A decision is recorded in ``out_dir/strategies.json``
under the chunk's identity (its group and a hash of its members' run ids), so a resumed sweep trains
every chunk exactly as the uninterrupted one did. Probe results are reused across sweeps only if
asked (``strategy_cache="global"`` or ``JSCALE_STRATEGY_CACHE=global``:
``$JSCALE_CACHE/strategy_probe.json``, keyed by backend, device kind, jax version, group shape and
R); by default nothing is written outside ``out_dir``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jscale import data as data_lib
from jscale import files
from jscale import mesh as mesh_lib
from jscale.config import ConfigError, RunConfig
from jscale.sweep import group as group_lib
from jscale.sweep.grid import _digest, run_id

STRATEGIES = ("auto", "vmap", "sequential")
#: Where ``auto`` keeps probe results: only in the sweep's ``strategies.json`` (default), or also in
#: one file shared by every sweep on this machine (``$JSCALE_CACHE/strategy_probe.json``).
STRATEGY_CACHES = ("sweep", "global")
#: Environment variable that sets the default ``strategy_cache``.
STRATEGY_CACHE_ENV = "JSCALE_STRATEGY_CACHE"
#: The ``auto`` probe times each strategy in ``PROBE_REPEATS`` blocks, interleaved (the order
#: alternating), each of at least ``PROBE_STEPS`` steps and ``PROBE_MIN_BLOCK_S`` seconds (after a
#: warm-up step), and compares the per-repeat time ratios with :func:`decide_strategy`.
PROBE_REPEATS = 5
PROBE_STEPS = 2
PROBE_MIN_BLOCK_S = 0.1
#: At most this many steps per block (a tiny model's step can take well under a millisecond).
PROBE_MAX_STEPS = 50
#: ``vmap`` must be at least this much faster than ``sequential`` (or more, if the measured spread is
#: wider) to be chosen.
PROBE_MIN_MARGIN = 0.05


class Strategies:
    """``auto`` decisions, recorded per chunk identity in the sweep's ``strategies.json`` so a resumed
    sweep decides the same way; with ``cache="global"`` probe results are also shared across sweeps
    in ``$JSCALE_CACHE/strategy_probe.json`` (by backend, device kind, jax version, shape and R)."""

    def __init__(self, out_dir: Path, cache: str = "sweep"):
        self.local_path = out_dir / "strategies.json"
        self.local = _read_json(self.local_path)
        self.global_path = files.cache_dir() / "strategy_probe.json" if cache == "global" else None
        self.cached = _read_json(self.global_path) if self.global_path is not None else {}

    def choose(self, chunk_key: str, members, common, corpus, layout,
               programs: ProgramCache) -> tuple[str, dict | None]:
        if chunk_key in self.local:
            return self.local[chunk_key]["choice"], self.local[chunk_key]
        # The probe times the unsharded programs (auto with a mesh is vmap, unprobed), so the
        # placement-free run_id of the shape is the right key across sweeps.
        device_key = (f"{jax.default_backend()}|{jax.local_devices()[0].device_kind}|"
                      f"jax {jax.__version__}|{run_id(common)}|R={len(members)}")
        probed = False
        if len(members) == 1:  # nothing to pack: the plain step is the vmapped one minus overhead
            probe = {"choice": "sequential", "R": 1, "reason": "a single run"}
        elif device_key in self.cached:
            probe = {**self.cached[device_key], "cached": str(self.global_path)}
        else:
            probe, probed = probe_strategies(members, common, corpus, layout, programs), True
        self.local[chunk_key] = probe
        if not mesh_lib.is_primary():
            return probe["choice"], probe
        if probed and self.global_path is not None:
            self.cached[device_key] = probe
            self.global_path.parent.mkdir(parents=True, exist_ok=True)
            files.atomic_write_text(self.global_path, json.dumps(self.cached, indent=1))
        files.atomic_write_text(self.local_path, json.dumps(self.local, indent=1))
        return probe["choice"], probe


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


class ProgramCache:
    """One set of jitted programs per (group, strategy): the ``auto`` probe compiles them, the run
    reuses them, so choosing costs one extra compilation (the strategy not chosen), not two.

    Keyed on a digest of the *whole* group config, mesh included — not on :func:`run_id`, which
    ignores the mesh: programs built for one mesh's layout must not serve a group on another. (In one
    ``sweep.run`` runs that differ only by mesh share a run id and are trained once; runs of one shape
    on different meshes form different groups, since the group id is the same full digest.)
    """

    def __init__(self):
        self._programs: dict[tuple[str, str], group_lib.Programs] = {}

    def get(self, common: RunConfig, strategy: str, layout) -> group_lib.Programs:
        key = (_digest(common.to_dict()), strategy)
        if key not in self._programs:
            self._programs[key] = group_lib.build_programs(common, strategy, layout)
        return self._programs[key]


def probe_strategies(members, common, corpus, layout, programs: ProgramCache) -> dict[str, Any]:
    """Time the chunk's steps under both strategies (compilation and a warm-up step excluded):
    ``PROBE_REPEATS`` interleaved blocks per strategy, the order alternating, and
    :func:`decide_strategy` on the per-repeat ratios. Costs about ``2 · PROBE_REPEATS ·
    PROBE_MIN_BLOCK_S`` seconds (1 s) on a small model, ``(1 + PROBE_STEPS · (1 + PROBE_REPEATS))
    · (R + 1)`` member steps (13 (R + 1)) on a big one, besides compiling the strategy not chosen."""
    tc = common.train
    batch1 = data_lib.eval_batches(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                   n_batches=1)[0]
    R = len(members)
    runners = {}
    for strategy, n in (("vmap", R), ("sequential", 1)):
        progs = programs.get(common, strategy, layout)
        state, alive = progs.init(group_lib._member_data(members[:n]))
        batch = {k: np.broadcast_to(v, (n, *v.shape)) for k, v in batch1.items()}
        runners[strategy] = [progs, state, alive, batch, np.ones(n, bool)]

    def block(strategy: str, steps: int) -> float:
        """Seconds per step of the whole chunk (sequential: one member's step × R)."""
        run_ = runners[strategy]
        progs, state, alive, batch, active = run_
        t0 = time.perf_counter()
        for _ in range(steps):
            state, alive, m = progs.step(state, alive, batch, active)
        jax.block_until_ready(m)
        run_[1], run_[2] = state, alive
        return (time.perf_counter() - t0) / steps * (R if strategy == "sequential" else 1)

    for strategy in runners:
        block(strategy, 1)  # warm-up: compilation, first-call allocations
    steps = {}
    for strategy in runners:  # steps per block: at least PROBE_MIN_BLOCK_S seconds
        per_step = block(strategy, PROBE_STEPS) / (R if strategy == "sequential" else 1)
        steps[strategy] = int(min(PROBE_MAX_STEPS, max(PROBE_STEPS,
                                                       math.ceil(PROBE_MIN_BLOCK_S / per_step))))
    times: dict[str, list[float]] = {"vmap": [], "sequential": []}
    for rep in range(PROBE_REPEATS):
        for strategy in (("vmap", "sequential") if rep % 2 == 0 else ("sequential", "vmap")):
            times[strategy].append(block(strategy, steps[strategy]))
    decision = decide_strategy([v / s for v, s in zip(times["vmap"], times["sequential"],
                                                      strict=True)])
    return {**decision, "vmap_s_per_step": float(np.median(times["vmap"])),
            "sequential_s_per_step": float(np.median(times["sequential"])), "R": R,
            "steps_per_block": steps}


def decide_strategy(ratios: Sequence[float], *, min_margin: float = PROBE_MIN_MARGIN
                    ) -> dict[str, Any]:
    """The ``auto`` rule on paired timings: ``ratios[i]`` is the chunk's time per step under ``vmap``
    divided by its time under ``sequential`` (R member steps) in repeat ``i``.

    ``ratio`` is their median and ``spread`` their half-range relative to it, ``(max − min) / (2 ·
    median)``: the noise of the measurement. ``vmap`` is chosen only if it wins by more than the noise,
    ``ratio < 1 − max(spread, min_margin)``; otherwise — within noise, or ``sequential`` faster — the
    simpler ``sequential`` (the plain step a single run uses).
    """
    r = np.asarray([x for x in ratios if np.isfinite(x) and x > 0], float)
    if r.size == 0:
        raise ValueError(f"decide_strategy: no finite positive time ratios in {list(ratios)}")
    ratio = float(np.median(r))
    spread = float((r.max() - r.min()) / (2 * ratio))
    noise = max(spread, min_margin)
    if ratio < 1 - noise:
        choice, verdict = "vmap", "vmap faster"
    elif ratio > 1 + noise:
        choice, verdict = "sequential", "sequential faster"
    else:
        choice, verdict = "sequential", "within noise: the baseline"
    return {"choice": choice, "ratio": ratio, "spread": spread, "threshold": 1 - noise,
            "verdict": verdict, "repeats": int(r.size)}


def describe(strategy: str, probe: dict | None) -> str:
    """How a chunk's strategy was chosen, for the printed summary line."""
    if probe is None:
        return strategy
    if "reason" in probe:
        return f"auto→{strategy} ({probe['reason']})"
    if "ratio" not in probe:  # a decision recorded before probes reported their spread
        return (f"auto→{strategy} (vmap {probe['vmap_s_per_step']:.3g} s/step vs sequential "
                f"{probe['sequential_s_per_step']:.3g} s/step)")
    cached = ", cached" if probe.get("cached") else ""
    return (f"auto→{strategy} (vmap/sequential time {probe['ratio']:.2f} ± {probe['spread']:.2f} "
            f"over {probe['repeats']} repeats, {probe['verdict']}{cached})")


def resolve_cache(strategy_cache: str | None) -> str:
    """The probe cache in effect: ``strategy_cache``, else ``$JSCALE_STRATEGY_CACHE``, else
    ``"sweep"``; checked against :data:`STRATEGY_CACHES`."""
    value = strategy_cache or os.environ.get(STRATEGY_CACHE_ENV) or "sweep"
    if value not in STRATEGY_CACHES:
        source = "strategy_cache" if strategy_cache else f"${STRATEGY_CACHE_ENV}"
        raise ConfigError(f"{source}: must be one of {list(STRATEGY_CACHES)} (got {value!r})")
    return value
