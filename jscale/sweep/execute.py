"""``sweep.run``: group runs by shape, pick a strategy per group, train, and record every result.

Flow: runs → ``out_dir/grid.json`` (the run ids asked for, so the store can tell stale rows) → drop
those already in ``out_dir/results.jsonl`` → groups by :func:`group.signature` → chunks of at most
``max_group_size`` members (and what fits in device memory) → per chunk a strategy → train → one
atomic commit of the chunk's rows. A chunk is the unit of commit: after a crash, a rerun retrains
exactly the unfinished chunks, with the same members, and so reproduces an uninterrupted sweep.

``strategy="auto"`` decides per chunk by a timed probe of both strategies, recorded per chunk so a
resumed sweep trains every chunk as the uninterrupted one did (:mod:`jscale.sweep.strategy`). Each
member's rows and result come from :mod:`jscale.records`, as a single run's do.

Grown runs (a ``growth`` section, :class:`~jscale.config.GrowthConfig`) and the sources they grow
from take another path (:mod:`jscale.sweep.lineage`): each source joins the grid (once per run id,
however many grown runs share it), and after the groups, every source and then every grown run
trains alone by :func:`jscale.train.train` in ``out_dir/runs/<run_id>/``, each committed as it
finishes, its row carrying the lineage. A grid without grown runs never takes that path.
"""

from __future__ import annotations

import json
import math
import os
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import pandas as pd
from tqdm.auto import tqdm

from jscale import core, models, records
from jscale import data as data_lib
from jscale import mesh as mesh_lib
from jscale.config import EPOCHS_WARN, ConfigError, RunConfig
from jscale.sweep import group as group_lib
from jscale.sweep import lineage as lineage_lib
from jscale.sweep import strategy as strategy_lib
from jscale.sweep.grid import InvalidRun, _digest, run_id
from jscale.sweep.store import ResultsStore
from jscale.sweep.strategy import STRATEGIES, decide_strategy  # noqa: F401 — re-exported

#: Fraction of device memory a chunk's estimated footprint may use.
MEMORY_FRACTION = 0.5


def device_memory_bytes() -> int:
    """Memory of one device: the accelerator's ``bytes_limit``, or half the host RAM on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def _chunks(members: list[RunConfig], max_group_size: int | None) -> list[list[RunConfig]]:
    tc = members[0].train
    per_member = models.memory_bytes(members[0].model, tc.batch_size, tc.seq_len)
    fit = max(1, int(MEMORY_FRACTION * device_memory_bytes() // per_member))
    size = min(fit, max_group_size or fit)
    return [members[i:i + size] for i in range(0, len(members), size)]


def _row(cfg: RunConfig, gid: str, **extra) -> dict[str, Any]:
    return {"run_id": run_id(cfg), "group_id": gid, "status": "ok", "error": None,
            **cfg.flat(), "budget": cfg.train.flops_budget, **extra}


def _result_row(cfg: RunConfig, gid: str, log: records.RunLog, corpus: data_lib.Corpus, *,
                strategy: str, wall: float, group_wall: float, size: int) -> dict[str, Any]:
    return _row(cfg, gid, **records.summary(cfg, log, corpus, wall_time_s=wall),
                wall_time_is_share=strategy == "vmap", group_wall_time_s=group_wall,
                group_size=size, strategy=strategy, device_kind=jax.local_devices()[0].device_kind,
                jax_version=jax.__version__)


def _epoch_failures(chunk: list[RunConfig], corpus: data_lib.Corpus) -> dict[str, str]:
    """``{run_id: error}`` of the members planned beyond ``data.max_epochs``; one warning for the
    chunk's members beyond ``EPOCHS_WARN``."""
    failed, over = {}, []
    for m in chunk:
        try:
            n = core.check_epochs(m, corpus, warn=False)
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
    :func:`jscale.sweep.strategy.decide_strategy`). ``auto`` records its decisions in
    ``out_dir/strategies.json``;
    ``strategy_cache="global"`` (default: ``$JSCALE_STRATEGY_CACHE``, else ``"sweep"``) also
    shares probe results across sweeps in ``$JSCALE_CACHE/strategy_probe.json``.
    ``max_group_size`` caps members per compiled program; groups are also split to fit in device
    memory. Finished runs already in ``out_dir`` are skipped (failed ones too, unless
    ``retry_failed``); a run that fails — an :class:`InvalidRun`, or an error while training — gets a
    ``status="failed"`` row with its ``error`` and the sweep goes on. Runs that differ only in
    :data:`~jscale.sweep.grid.PLACEMENT_FIELDS` (the mesh, the cache directory) have one run id:
    the first of them trains, and a rerun on another mesh skips finished runs.

    A run with a ``growth`` section starts from its source, the smaller run
    :meth:`RunConfig.source_config` describes, which becomes a member of the sweep too: inserted
    just before the first run grown from it unless the grid lists it earlier, and trained once
    however many runs grow from it. Sources and grown runs train one at a time by
    :func:`jscale.train.train`, sources first, in run directories ``out_dir/runs/<run_id>/`` (a
    crashed sweep resumes them from their checkpoints; their rows have ``strategy="single"`` and
    ``group_id="runs/<run_id>"``). A grown run's row adds ``source_run_id`` (its source's run id),
    ``source_run`` (its directory), ``growth_op``, ``source_step``, ``source_tokens``,
    ``source_flops``, ``total_tokens`` and ``total_flops`` (source included); in the frame the
    other rows have no lineage and ``total_*`` equal to their own ``tokens``/``flops``. A grown
    run whose source failed or diverged is recorded as failed.

    The run ids of ``runs`` (and of the sources added) are recorded as the directory's latest grid
    (``out_dir/grid.json``); the returned frame holds these runs' rows in grid order, and like
    :func:`load` carries the boolean column ``in_latest_grid`` (here all ``True``).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: must be one of {list(STRATEGIES)} (got {strategy!r})")
    cache = strategy_lib.resolve_cache(strategy_cache)
    out = Path(out_dir)
    primary = mesh_lib.is_primary()  # multi-process: process 0 writes, every process trains
    store = ResultsStore(out, writer=primary)
    done = store.done_ids(include_failed=not retry_failed)
    wanted: dict[str, RunConfig | InvalidRun] = {}
    for r in runs:
        wanted.setdefault(run_id(r), r)
    wanted, source_of = lineage_lib.expand(wanted)
    store.set_grid(list(wanted))
    todo = [r for rid, r in wanted.items() if rid not in done]
    single = set(source_of) | set(source_of.values())  # trained one at a time, in run directories

    invalid = [r for r in todo if isinstance(r, InvalidRun)]
    if invalid:
        store.commit([{"run_id": r.run_id, "group_id": None, "status": "failed", "error": r.error,
                       **dict(r.overrides)} for r in invalid])
    # The group id digests the whole signature, mesh included (unlike run_id): one group's members
    # share one mesh, the one its programs are built for.
    groups: dict[str, list[RunConfig]] = {}
    for r in todo:
        if not isinstance(r, InvalidRun) and run_id(r) not in single:
            groups.setdefault(_digest(group_lib.signature(r).to_dict()), []).append(r)

    bar = tqdm(total=len(wanted), initial=len(wanted) - len(todo) + len(invalid), unit="run",
               desc="sweep", disable=not (progress and primary), dynamic_ncols=True, smoothing=0.05,
               bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} runs [{elapsed}<{remaining}]{postfix}")
    strategies, programs = strategy_lib.Strategies(out, cache), strategy_lib.ProgramCache()
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
    if single:
        todo_ids = {run_id(r) for r in todo}

        def on_done(rid: str, message: str) -> None:
            bar.update(rid in todo_ids)
            if progress and primary:
                bar.write(f"run {rid}: {message}")
        bar.set_postfix_str(f"{len(single)} sources and grown runs")
        lineage_lib.train_members(wanted, source_of, todo_ids, store,
                                  row_of=_row, on_done=on_done)
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
    chosen = strategy_lib.describe(strategy, probe)
    return rows, f"{chosen}, {wall:.1f} s, best eval loss {best:.4f}, {n_div} diverged"
