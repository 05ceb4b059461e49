"""``sweep.run``: group runs by shape, pick a strategy per group, train, and record every result.

Flow: runs → drop those already in ``out_dir/results.jsonl`` → groups by :func:`group.signature` →
chunks of at most ``max_group_size`` members (and what fits in device memory) → per chunk a
strategy (``"auto"`` times both on the chunk and keeps the faster; the choice is cached per backend
and recorded in ``out_dir/strategies.json`` so a resumed sweep makes the same one) → train → one
atomic commit of the chunk's rows. A chunk is the unit of commit: after a crash, a rerun retrains
exactly the unfinished chunks, with the same members, and so reproduces an uninterrupted sweep.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from jscale import data as data_lib
from jscale import models
from jscale import sharding as sharding_lib
from jscale.config import ConfigError, RunConfig
from jscale.sweep import group as group_lib
from jscale.sweep.grid import InvalidRun, run_id
from jscale.sweep.store import ResultsStore, _atomic_write_text
from jscale.train import FINAL_LOSS_ROWS

STRATEGIES = ("auto", "vmap", "sequential")
#: Steps timed per strategy by the ``auto`` probe (after one warm-up step).
PROBE_STEPS = 3
#: Fraction of device memory a chunk's estimated footprint may use.
MEMORY_FRACTION = 0.5


def _cache_dir() -> Path:
    return Path(os.environ.get("JSCALE_CACHE") or Path.home() / ".cache" / "jscale")


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


def _result_row(cfg: RunConfig, gid: str, log: group_lib._MemberLog, *, strategy: str,
                wall: float, size: int) -> dict[str, Any]:
    counts = models.count_params(cfg.model)
    fpt = models.flops_per_token(cfg.model, cfg.train.seq_len)["training"]
    steps = log.diverged_step or cfg.train.steps
    tokens = steps * cfg.train.batch_size * cfg.train.seq_len
    tail = [r["loss"] for r in log.rows[-FINAL_LOSS_ROWS:]]
    return _row(cfg, gid, n_params=counts["total"], n_params_non_embedding=counts["non_embedding"],
                flops_per_token=fpt, tokens=tokens, flops=fpt * tokens,
                final_train_loss=float(np.mean(tail)) if tail else None,
                final_eval_loss=(log.eval_losses[-1] if log.eval_losses and log.running else None),
                min_eval_loss=min(log.eval_losses) if log.eval_losses else None,
                diverged=not log.running, diverged_step=log.diverged_step,
                wall_time_s=wall / size, group_wall_time_s=wall, group_size=size,
                strategy=strategy, device_kind=jax.local_devices()[0].device_kind,
                jax_version=jax.__version__)


class _Strategies:
    """``auto`` decisions: probed once per (backend, device, group, R), cached on disk and recorded
    in the sweep's own ``strategies.json`` so a resumed sweep decides the same way."""

    def __init__(self, out_dir: Path):
        self.local_path = out_dir / "strategies.json"
        self.global_path = _cache_dir() / "strategy_probe.json"
        self.local = _read_json(self.local_path)
        self.cached = _read_json(self.global_path)

    def choose(self, chunk_key: str, members, common, corpus, layout,
               programs: _ProgramCache) -> tuple[str, dict | None]:
        if chunk_key in self.local:
            return self.local[chunk_key]["choice"], self.local[chunk_key]
        device_key = f"{jax.default_backend()}|{jax.local_devices()[0].device_kind}|{chunk_key}"
        if len(members) == 1:  # nothing to pack: the plain step is the vmapped one minus overhead
            probe = {"choice": "sequential", "R": 1, "reason": "a single run"}
        else:
            probe = self.cached.get(device_key) or _probe(members, common, corpus, layout, programs)
        self.cached[device_key] = self.local[chunk_key] = probe
        if not sharding_lib.is_primary():
            return probe["choice"], probe
        self.global_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.global_path, json.dumps(self.cached, indent=1))
        _atomic_write_text(self.local_path, json.dumps(self.local, indent=1))
        return probe["choice"], probe


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


class _ProgramCache:
    """One set of jitted programs per (group, strategy): the ``auto`` probe compiles them, the run
    reuses them, so choosing costs one extra compilation (the strategy not chosen), not two."""

    def __init__(self):
        self._programs: dict[tuple[str, str], group_lib.Programs] = {}

    def get(self, common: RunConfig, strategy: str, layout) -> group_lib.Programs:
        key = (run_id(common), strategy)
        if key not in self._programs:
            self._programs[key] = group_lib.build_programs(common, strategy, layout)
        return self._programs[key]


def _probe(members, common, corpus, layout, programs: _ProgramCache) -> dict[str, Any]:
    """Time ``PROBE_STEPS`` steps of the chunk under both strategies (compilation excluded)."""
    tc = common.train
    batch1 = data_lib.eval_batches(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                   n_batches=1)[0]
    times = {}
    for strategy, R in (("vmap", len(members)), ("sequential", 1)):
        progs = programs.get(common, strategy, layout)
        state, alive = progs.init(group_lib._member_data(members[:R]))
        batch = {k: np.broadcast_to(v, (R, *v.shape)) for k, v in batch1.items()}
        active = np.ones(R, bool)
        state, alive, m = progs.step(state, alive, batch, active)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(PROBE_STEPS):
            state, alive, m = progs.step(state, alive, batch, active)
        jax.block_until_ready(m)
        per_step = (time.perf_counter() - t0) / PROBE_STEPS
        times[strategy] = per_step * (1 if strategy == "vmap" else len(members))
    return {"choice": min(times, key=times.get), "vmap_s_per_step": times["vmap"],
            "sequential_s_per_step": times["sequential"], "R": len(members)}


def run(runs: Sequence[RunConfig | InvalidRun], out_dir: str | os.PathLike, *,
        strategy: str = "auto", max_group_size: int | None = None, progress: bool = True,
        retry_failed: bool = False) -> pd.DataFrame:
    """Train every run in ``runs`` into ``out_dir`` and return their results as a DataFrame.

    Runs that share a shape signature train together (see :mod:`jscale.sweep.group`) under
    ``strategy``: ``"vmap"``, ``"sequential"``, or ``"auto"`` (a short timed probe of both per group,
    cached). ``max_group_size`` caps members per compiled program; groups are also split to fit in
    device memory. Finished runs already in ``out_dir`` are skipped (failed ones too, unless
    ``retry_failed``); a run that fails — an :class:`InvalidRun`, or an error while training — gets a
    ``status="failed"`` row with its ``error`` and the sweep goes on.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: must be one of {list(STRATEGIES)} (got {strategy!r})")
    out = Path(out_dir)
    primary = sharding_lib.is_primary()  # multi-process: process 0 writes, every process trains
    store = ResultsStore(out, writer=primary)
    done = store.done_ids(include_failed=not retry_failed)
    wanted: dict[str, RunConfig | InvalidRun] = {}
    for r in runs:
        wanted.setdefault(run_id(r), r)
    todo = [r for rid, r in wanted.items() if rid not in done]

    invalid = [r for r in todo if isinstance(r, InvalidRun)]
    if invalid:
        store.commit([{"run_id": r.run_id, "group_id": None, "status": "failed", "error": r.error,
                       **dict(r.overrides)} for r in invalid])
    groups: dict[str, list[RunConfig]] = {}
    for r in todo:
        if not isinstance(r, InvalidRun):
            groups.setdefault(run_id(group_lib.signature(r)), []).append(r)

    bar = tqdm(total=len(wanted), initial=len(wanted) - len(todo) + len(invalid), unit="run",
               desc="sweep", disable=not (progress and primary), dynamic_ncols=True, smoothing=0.05,
               bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} runs [{elapsed}<{remaining}]{postfix}")
    strategies, programs = _Strategies(out), _ProgramCache()
    corpora: dict[tuple, data_lib.Corpus] = {}
    for gi, (gid, members) in enumerate(groups.items(), 1):
        common = group_lib.signature(members[0])
        for ci, chunk in enumerate(_chunks(members, max_group_size)):
            bar.set_postfix_str(f"group {gi}/{len(groups)} ({len(chunk)} runs)")
            t_start = bar.n
            try:
                rows, summary = _run_chunk(chunk, common, gid, f"{gid}/{ci}/{len(chunk)}", strategy,
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
    if strategy == "vmap":
        logs, wall = group_lib.run_group(chunk, progs, corpus, on_step=on_step)
    else:
        logs, wall = [], 0.0
        for member in chunk:
            (log,), w = group_lib.run_group([member], progs, corpus, on_step=on_step)
            logs.append(log)
            wall += w
    rows = [_result_row(m, gid, log, strategy=strategy, wall=wall, size=len(chunk))
            for m, log in zip(chunk, logs, strict=True)]
    for row, log in zip(rows, logs, strict=True):
        store.write_curve(row["run_id"], log.rows)
    for row in rows:
        row["group_compiles"] = len(progs.traces)  # traces of this strategy's step (probe included)
    n_div = sum(r["diverged"] for r in rows)
    best = min((r["final_eval_loss"] for r in rows if r["final_eval_loss"] is not None),
               default=math.nan)
    if probe is None:
        chosen = strategy
    elif "reason" in probe:
        chosen = f"auto→{strategy} ({probe['reason']})"
    else:
        chosen = (f"auto→{strategy} (vmap {probe['vmap_s_per_step']:.3g} s/step vs sequential "
                  f"{probe['sequential_s_per_step']:.3g} s/step)")
    return rows, f"{chosen}, {wall:.1f} s, best eval loss {best:.4f}, {n_div} diverged"
