"""``sweep.run``: group runs by shape, pick a strategy per group, train, and record every result.

Flow: runs → ``out_dir/grid.json`` (the run ids asked for, so the store can tell stale rows) → drop
those already in ``out_dir/results.jsonl`` → groups by :func:`group.signature` → chunks of at most
``max_group_size`` members (and what fits in device memory) → per chunk a strategy → train → one
atomic commit of the chunk's rows. A chunk is the unit of commit: after a crash, a rerun retrains
exactly the unfinished chunks, with the same members, and so reproduces an uninterrupted sweep.

``strategy="auto"`` decides per chunk by a timed probe (:func:`_probe`): a few steps of each strategy,
interleaved and repeated, compared by :func:`decide_strategy`. ``"sequential"`` is the baseline —
the plain un-batched step, the program a single run compiles, one member's memory at a time — and
``"vmap"`` (one program over R members) must beat it by more than the measured noise. A decision is
recorded in ``out_dir/strategies.json`` under the chunk's identity (its group and a hash of its
members' run ids), so a resumed sweep trains every chunk exactly as the uninterrupted one did. Probe
results are reused across sweeps only if asked (``strategy_cache="global"`` or
``JSCALE_STRATEGY_CACHE=global``: ``$JSCALE_CACHE/strategy_probe.json``, keyed by backend, device
kind, jax version, group shape and R); by default nothing is written outside ``out_dir``.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from jscale import data as data_lib
from jscale import files, models
from jscale import sharding as sharding_lib
from jscale import train as train_lib
from jscale.config import EPOCHS_WARN, ConfigError, RunConfig
from jscale.sweep import group as group_lib
from jscale.sweep.grid import InvalidRun, _digest, run_id
from jscale.sweep.store import ResultsStore

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
#: Fraction of device memory a chunk's estimated footprint may use.
MEMORY_FRACTION = 0.5


def member_bytes(cfg: RunConfig) -> int:
    """Rough per-run device footprint: params, grads and Adam moments (4 copies) in float32, plus
    activations (about 24 floats per layer per token and width) and the float32 logits twice."""
    n = models.count_params(cfg.model)["total"]
    tokens = cfg.train.batch_size * cfg.train.seq_len
    layers = getattr(cfg.model, "n_layers", 1)
    width = getattr(cfg.model, "d_model", 1)
    return 4 * (4 * n + 24 * tokens * layers * width + 2 * tokens * cfg.model.vocab_size)


def device_memory_bytes() -> int:
    """Memory of one device: the accelerator's ``bytes_limit``, or half the host RAM on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def _chunks(members: list[RunConfig], max_group_size: int | None) -> list[list[RunConfig]]:
    fit = max(1, int(MEMORY_FRACTION * device_memory_bytes() // member_bytes(members[0])))
    size = min(fit, max_group_size or fit)
    return [members[i:i + size] for i in range(0, len(members), size)]


def _row(cfg: RunConfig, gid: str, **extra) -> dict[str, Any]:
    return {"run_id": run_id(cfg), "group_id": gid, "status": "ok", "error": None,
            **cfg.flat(), "budget": cfg.train.flops_budget, **extra}


def _result_row(cfg: RunConfig, gid: str, log: group_lib._MemberLog, corpus: data_lib.Corpus, *,
                strategy: str, wall: float, group_wall: float, size: int) -> dict[str, Any]:
    counts = models.count_params(cfg.model)
    fpt = models.flops_per_token(cfg.model, cfg.train.seq_len)["training"]
    tc = cfg.train
    steps = log.diverged_step or tc.steps
    tokens = steps * tc.batch_size * tc.seq_len
    return _row(cfg, gid, n_params=counts["total"], n_params_non_embedding=counts["non_embedding"],
                n_params_with_head=counts["with_head"],
                flops_per_token=fpt, tokens=tokens, flops=fpt * tokens,
                epochs=data_lib.epochs(corpus, tokens),
                final_train_loss=log.final_train_loss,
                final_eval_loss=(log.eval_losses[-1] if log.eval_losses and log.running else None),
                min_eval_loss=min(log.eval_losses) if log.eval_losses else None,
                eval_tokens=data_lib.eval_tokens(corpus, seq_len=tc.seq_len,
                                                 batch_size=tc.batch_size,
                                                 n_batches=tc.eval_batches),
                diverged=not log.running, diverged_step=log.diverged_step,
                wall_time_s=wall, wall_time_is_share=strategy == "vmap",
                group_wall_time_s=group_wall, group_size=size,
                strategy=strategy, device_kind=jax.local_devices()[0].device_kind,
                jax_version=jax.__version__)


def _epoch_failures(chunk: list[RunConfig], corpus: data_lib.Corpus) -> dict[str, str]:
    """``{run_id: error}`` of the members planned beyond ``data.max_epochs``; one warning for the
    chunk's members beyond ``EPOCHS_WARN``."""
    failed, over = {}, []
    for m in chunk:
        try:
            n = train_lib.check_epochs(m, corpus, warn=False)
        except ConfigError as e:
            failed[run_id(m)] = str(e)
            continue
        if n > EPOCHS_WARN:
            over.append(n)
    if over:
        warnings.warn(f"jscale: {len(over)} run(s) repeat the training split up to "
                      f"{max(over):.3g} epochs (> {EPOCHS_WARN:g}: repeated tokens are worth less "
                      "than fresh ones; a law fitted on such runs is not a compute-optimal one)",
                      stacklevel=2)
    return failed


class _Strategies:
    """``auto`` decisions, recorded per chunk identity in the sweep's ``strategies.json`` so a resumed
    sweep decides the same way; with ``cache="global"`` probe results are also shared across sweeps
    in ``$JSCALE_CACHE/strategy_probe.json`` (by backend, device kind, jax version, shape and R)."""

    def __init__(self, out_dir: Path, cache: str = "sweep"):
        self.local_path = out_dir / "strategies.json"
        self.local = _read_json(self.local_path)
        self.global_path = files.cache_dir() / "strategy_probe.json" if cache == "global" else None
        self.cached = _read_json(self.global_path) if self.global_path is not None else {}

    def choose(self, chunk_key: str, members, common, corpus, layout,
               programs: _ProgramCache) -> tuple[str, dict | None]:
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
            probe, probed = _probe(members, common, corpus, layout, programs), True
        self.local[chunk_key] = probe
        if not sharding_lib.is_primary():
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


class _ProgramCache:
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


def _probe(members, common, corpus, layout, programs: _ProgramCache) -> dict[str, Any]:
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


def _describe(strategy: str, probe: dict | None) -> str:
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


def _strategy_cache(strategy_cache: str | None) -> str:
    value = strategy_cache or os.environ.get(STRATEGY_CACHE_ENV) or "sweep"
    if value not in STRATEGY_CACHES:
        source = "strategy_cache" if strategy_cache else f"${STRATEGY_CACHE_ENV}"
        raise ConfigError(f"{source}: must be one of {list(STRATEGY_CACHES)} (got {value!r})")
    return value


def _chunk_key(gid: str, chunk: Sequence[RunConfig]) -> str:
    """A chunk's identity: its group and a hash of its members' run ids (in order). It survives a
    resume, where the count of unfinished chunks before it does not."""
    return f"{gid}/{_digest([run_id(m) for m in chunk])}"


def run(runs: Sequence[RunConfig | InvalidRun], out_dir: str | os.PathLike, *,
        strategy: str = "auto", max_group_size: int | None = None, progress: bool = True,
        retry_failed: bool = False, strategy_cache: str | None = None) -> pd.DataFrame:
    """Train every run in ``runs`` into ``out_dir`` and return their results as a DataFrame.

    Runs that share a shape signature train together (see :mod:`jscale.sweep.group`) under
    ``strategy``: ``"vmap"``, ``"sequential"``, or ``"auto"`` (a short timed probe of both per chunk
    of a group; ``vmap`` only if it wins by more than the measured noise, see
    :func:`decide_strategy`). ``auto`` records its decisions in ``out_dir/strategies.json``;
    ``strategy_cache="global"`` (default: ``$JSCALE_STRATEGY_CACHE``, else ``"sweep"``) also
    shares probe results across sweeps in ``$JSCALE_CACHE/strategy_probe.json``.
    ``max_group_size`` caps members per compiled program; groups are also split to fit in device
    memory. Finished runs already in ``out_dir`` are skipped (failed ones too, unless
    ``retry_failed``); a run that fails — an :class:`InvalidRun`, or an error while training — gets a
    ``status="failed"`` row with its ``error`` and the sweep goes on. Runs that differ only in
    :data:`~jscale.sweep.grid.PLACEMENT_FIELDS` (the mesh, the cache directory) have one run id:
    the first of them trains, and a rerun on another mesh skips finished runs.

    The run ids of ``runs`` are recorded as the directory's latest grid (``out_dir/grid.json``);
    the returned frame holds these runs' rows in grid order, and like :func:`load` carries the
    boolean column ``in_latest_grid`` (here all ``True``).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: must be one of {list(STRATEGIES)} (got {strategy!r})")
    cache = _strategy_cache(strategy_cache)
    out = Path(out_dir)
    primary = sharding_lib.is_primary()  # multi-process: process 0 writes, every process trains
    store = ResultsStore(out, writer=primary)
    done = store.done_ids(include_failed=not retry_failed)
    wanted: dict[str, RunConfig | InvalidRun] = {}
    for r in runs:
        wanted.setdefault(run_id(r), r)
    store.set_grid(list(wanted))
    todo = [r for rid, r in wanted.items() if rid not in done]

    invalid = [r for r in todo if isinstance(r, InvalidRun)]
    if invalid:
        store.commit([{"run_id": r.run_id, "group_id": None, "status": "failed", "error": r.error,
                       **dict(r.overrides)} for r in invalid])
    # The group id digests the whole signature, mesh included (unlike run_id): one group's members
    # share one mesh, the one its programs are built for.
    groups: dict[str, list[RunConfig]] = {}
    for r in todo:
        if not isinstance(r, InvalidRun):
            groups.setdefault(_digest(group_lib.signature(r).to_dict()), []).append(r)

    bar = tqdm(total=len(wanted), initial=len(wanted) - len(todo) + len(invalid), unit="run",
               desc="sweep", disable=not (progress and primary), dynamic_ncols=True, smoothing=0.05,
               bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} runs [{elapsed}<{remaining}]{postfix}")
    strategies, programs = _Strategies(out, cache), _ProgramCache()
    corpora: dict[tuple, data_lib.Corpus] = {}
    for gi, (gid, members) in enumerate(groups.items(), 1):
        common = group_lib.signature(members[0])
        for ci, chunk in enumerate(_chunks(members, max_group_size)):
            bar.set_postfix_str(f"group {gi}/{len(groups)} ({len(chunk)} runs)")
            t_start = bar.n
            try:
                rows, summary = _run_chunk(chunk, common, gid, _chunk_key(gid, chunk), strategy,
                                           strategies, programs, corpora, store, bar)
            except Exception as e:  # noqa: BLE001 — a failing group must not end the sweep
                error = f"{type(e).__name__}: {e}"
                rows = [_row(m, gid, status="failed", error=error) for m in chunk]
                summary = f"FAILED: {error}"
                if not isinstance(e, ConfigError):
                    summary += "\n" + "".join(traceback.format_exception(e)[-3:])
            store.commit(rows)
            bar.update(t_start + len(chunk) - bar.n)
            if progress and primary:
                bar.write(f"group {gid} chunk {ci} ({len(chunk)} runs): {summary}")
    bar.close()
    frame = store.frame()
    if frame.empty:
        return frame
    return frame[frame["run_id"].isin(wanted)].set_index("run_id").loc[list(wanted)].reset_index()


def _run_chunk(chunk, common, gid, chunk_key, strategy, strategies, programs, corpora, store, bar):
    key = (json.dumps(common.to_dict()["data"], sort_keys=True), common.model.vocab_size,
           common.train.seq_len)
    if key not in corpora:
        corpora[key] = data_lib.load_corpus(common.data, common.model.vocab_size,
                                            common.train.seq_len)
    corpus = corpora[key]
    layout = group_lib.make_layout(common)
    probe = None
    if strategy == "auto" and layout is not None:
        strategy, probe = "vmap", {"reason": "sharded over the mesh"}
    elif strategy == "auto":
        strategy, probe = strategies.choose(chunk_key, chunk, common, corpus, layout, programs)
    on_step = (lambda frac: bar.update(frac)) if not bar.disable else None
    progs = programs.get(common, strategy, layout)
    too_long = _epoch_failures(chunk, corpus)
    members = [m for m in chunk if run_id(m) not in too_long]
    if not members:
        logs, walls, wall = [], [], 0.0
    elif strategy == "vmap":
        logs, wall = group_lib.run_group(members, progs, corpus, on_step=on_step)
        walls = [wall / len(members)] * len(members)  # one program: each member's share
    else:
        logs, walls = [], []
        for member in members:
            (log,), w = group_lib.run_group([member], progs, corpus, on_step=on_step)
            logs.append(log)
            walls.append(w)
        wall = sum(walls)
    rows, trained = [], iter(zip(logs, walls, strict=True))
    for m in chunk:
        if (rid := run_id(m)) in too_long:
            rows.append(_row(m, gid, status="failed", error=too_long[rid]))
            continue
        log, w = next(trained)
        rows.append(_result_row(m, gid, log, corpus, strategy=strategy, wall=w, group_wall=wall,
                                size=len(members)))
        store.write_curve(rid, log.rows)
    for row in rows:
        row["group_compiles"] = len(progs.traces)  # traces of this strategy's step (probe included)
    n_div = sum(bool(r.get("diverged")) for r in rows)
    best = min((r["final_eval_loss"] for r in rows if r.get("final_eval_loss") is not None),
               default=math.nan)
    chosen = _describe(strategy, probe)
    return rows, f"{chosen}, {wall:.1f} s, best eval loss {best:.4f}, {n_div} diverged"
