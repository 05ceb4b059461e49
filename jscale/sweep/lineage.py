"""Grown runs in a sweep: members with a ``growth`` section (:class:`~jscale.config.GrowthConfig`)
and the source runs they grow from.

:func:`expand` adds each grown member's source (:meth:`RunConfig.source_config`) to the grid, once
per run id: a source the grid already lists, or one several grown runs share, is one member. A
source is never grown itself (its ``growth`` section is removed, and ``growth.source`` may not set
one), so one pass — every source, then every grown run — trains each source before the runs grown
from it.

:func:`train_members` trains these members one at a time with :func:`jscale.train.train`, each into
its own run directory ``out_dir/runs/<run_id>/`` (``config.json``, checkpoints, ``metrics.jsonl``,
``summary.json``): a grown run grows its source's final checkpoint, and after a crash both resume
from their own checkpoints — a finished one is not retrained. Each member's row is committed to
the results store as soon as it finishes (one atomic commit per run), built from its
``summary.json`` as any member's is, with ``group_id`` ``runs/<run_id>`` and ``strategy``
``"single"``; its curve is its ``metrics.jsonl``. A grown run's row adds its lineage
(:func:`jscale.records.with_lineage`: ``source_run`` — the source's directory —, ``source_step``,
``growth_op``, ``source_tokens``, ``source_flops``, ``total_tokens``, ``total_flops``) and
``source_run_id``, the source member's run id. A grown run whose source failed or diverged gets a
``status="failed"`` row saying so.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax

from jscale import files
from jscale.config import ConfigError, RunConfig
from jscale.sweep.grid import InvalidRun, run_id
from jscale.sweep.store import ResultsStore

#: Where the single runs of a sweep (sources and grown runs) keep their run directories.
RUNS = "runs"

#: The ``strategy`` of a row trained by :func:`jscale.train.train` in its own run directory.
SINGLE = "single"


def expand(wanted: Mapping[str, RunConfig | InvalidRun]
           ) -> tuple[dict[str, RunConfig | InvalidRun], dict[str, str]]:
    """``(members, source_of)``: ``wanted`` (run id → run, in grid order) with each grown run's
    source inserted just before it, unless the grid lists that source earlier (then it stays where
    it is; one listed later moves up before the first run grown from it); ``source_of`` maps each
    grown run's id to its source's. ``source_config()`` raises :class:`ConfigError` naming
    ``growth.source`` / ``growth.op`` for a source that cannot be built — but such a config cannot
    exist (``RunConfig`` checks its source when it is built; a grid records it as an
    :class:`InvalidRun`)."""
    grown = {rid: r for rid, r in wanted.items()
             if isinstance(r, RunConfig) and r.growth is not None}
    members: dict[str, RunConfig | InvalidRun] = {}
    source_of: dict[str, str] = {}
    for rid, r in wanted.items():
        if rid in grown:
            src = r.source_config()
            source_of[rid] = sid = run_id(src)
            members.setdefault(sid, wanted.get(sid, src))
        members.setdefault(rid, r)
    return members, source_of


def run_dir(out_dir: str | Path, rid: str) -> Path:
    """The run directory of single-run member ``rid`` of the sweep in ``out_dir``."""
    return Path(out_dir) / RUNS / rid


def _train(cfg: RunConfig, out: Path, source_dir: Path | None) -> dict[str, Any]:
    from jscale import train  # the single-run driver: imported when a sweep has grown runs
    if source_dir is None:
        return train.train(cfg, out, quiet=True)
    return train.train(cfg, out, quiet=True, grow_from=source_dir)


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as it reads back from ``results.jsonl`` (a ``growth.source`` tuple as a list), so a
    sweep's frame and :func:`jscale.sweep.load`'s hold the same values."""
    return json.loads(json.dumps(row))


def _failed(row_of: Callable[..., dict[str, Any]], cfg: RunConfig, rid: str,
            error: str) -> dict[str, Any]:
    return _plain(row_of(cfg, f"{RUNS}/{rid}", status="failed", error=error))


def train_members(members: Mapping[str, RunConfig | InvalidRun], source_of: Mapping[str, str],
                  todo: set[str], store: ResultsStore, *,
                  row_of: Callable[..., dict[str, Any]],
                  on_done: Callable[[str, str], None]) -> None:
    """Train the sources and grown runs among ``members`` (see the module docstring).

    ``todo``: the run ids without a row yet (or to retry); a source that has a row is trained
    anyway when a grown run in ``todo`` needs its run directory (a finished one is not retrained),
    and its row is replaced only if it trained here. ``row_of(cfg, group_id, **fields)``: the
    sweep's row for a member (its config columns and ``fields``). ``on_done(run_id, message)``:
    called after each member's row is committed.
    """
    out = store.out_dir
    committed = {r["run_id"]: r for r in store.rows}
    needed = {source_of[g] for g in todo if g in source_of}
    sources: dict[str, dict[str, Any]] = {}  # source id -> its row
    source_ids = set(source_of.values())
    for sid in (s for s in members if s in source_ids):
        if sid not in todo and sid not in needed:
            continue
        cfg, prior = members[sid], committed.get(sid)
        if sid not in todo and prior is not None and prior.get("status") == "failed":
            sources[sid] = prior  # failed before, not retried
            continue
        fresh = not (run_dir(out, sid) / "summary.json").exists()
        row = _single_row(cfg, sid, None, row_of, store)
        sources[sid] = row
        if sid in todo or fresh:
            store.commit([row])
            on_done(sid, _describe(row))
    for rid in (g for g in members if g in source_of and g in todo):
        cfg, sid = members[rid], source_of[rid]
        src = sources[sid]
        if src.get("status") == "failed":
            row = _failed(row_of, cfg, rid, f"source {sid} failed: {src.get('error')}")
        elif src.get("diverged"):
            row = _failed(row_of, cfg, rid, f"source {sid} diverged at step "
                          f"{src.get('diverged_step')}: there is no trained model to grow")
        else:
            row = _single_row(cfg, rid, sid, row_of, store)
        store.commit([row])
        on_done(rid, _describe(row))


def _single_row(cfg: RunConfig, rid: str, sid: str | None, row_of, store: ResultsStore
                ) -> dict[str, Any]:
    """Train (or read back) one member in its run directory and return its row (``sid``: the
    source's run id, for a grown run); an error gives a failed row."""
    out = run_dir(store.out_dir, rid)
    try:
        summary = _train(cfg, out, None if sid is None else run_dir(store.out_dir, sid))
    except Exception as e:  # noqa: BLE001 — a failing run must not end the sweep
        error = f"{type(e).__name__}: {e}"
        if not isinstance(e, ConfigError):
            error += "\n" + "".join(traceback.format_exception(e)[-3:])
        return _failed(row_of, cfg, rid, error)
    extra = {} if sid is None else {"source_run_id": sid}
    row = row_of(cfg, f"{RUNS}/{rid}", **summary, **extra, wall_time_is_share=False,
                 group_wall_time_s=summary["wall_time_s"], group_size=1, strategy=SINGLE,
                 device_kind=jax.local_devices()[0].device_kind, jax_version=jax.__version__,
                 group_compiles=None)
    store.write_curve(rid, files.read_jsonl(out / "metrics.jsonl"))
    return _plain(row)


def _describe(row: Mapping[str, Any]) -> str:
    if row.get("status") == "failed":
        return f"FAILED: {str(row.get('error')).splitlines()[0]}"
    if row.get("diverged"):
        return f"DIVERGED at step {row.get('diverged_step')}"
    grown = (f", grown from {row['source_run_id']} by {row['growth_op']}"
             if row.get("source_run_id") else "")
    return f"eval loss {row['final_eval_loss']:.4f}{grown}, {row['wall_time_s']:.1f} s"

