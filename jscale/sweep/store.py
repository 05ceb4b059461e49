"""The results store: ``out_dir/results.jsonl`` (one row per finished run) and ``out_dir/curves/``.

Rows are committed a whole group at a time by writing a new file and ``os.replace``-ing it over the
old one, so a crash at any moment leaves either the old table or the new one — never a torn or
duplicate row — and a resumed sweep recomputes unfinished groups with exactly the members they had.

Rows are never deleted: after a grid is edited, the old runs' rows stay in the table. So the store
also keeps ``out_dir/grid.json``, the run ids of the grid the latest ``sweep.run`` was given (written
atomically when it starts), and every frame it returns carries a boolean column ``in_latest_grid``
(all ``True`` when there is no ``grid.json``, as in a directory written before it existed). Law fits
leave out the rows where it is ``False`` by default.

A table with grown runs (:mod:`jscale.sweep.lineage`) has their lineage columns; its frames fill
the other rows' ``total_tokens`` / ``total_flops`` from their own ``tokens`` / ``flops``
(:data:`TOTALS`), so every row can be placed on one total-compute axis.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from jscale import files

RESULTS = "results.jsonl"
CURVES = "curves"
GRID = "grid.json"
#: Column of every frame: is the row's run in the grid of the latest ``sweep.run`` call?
IN_LATEST_GRID = "in_latest_grid"
#: A grown run's total compute (source included) → the column a run not grown counts instead:
#: where a table has grown rows, a frame fills the others' totals from it.
TOTALS = {"total_tokens": "tokens", "total_flops": "flops"}


class ResultsStore:
    """Append-only (at group granularity), crash-safe table of run results under ``out_dir``.

    ``writer=False`` (every process of a multi-process sweep but process 0) keeps the table in memory
    and writes nothing.
    """

    def __init__(self, out_dir: str | os.PathLike, *, writer: bool = True):
        self.out_dir = Path(out_dir)
        self.writer = writer
        if writer:
            (self.out_dir / CURVES).mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / RESULTS
        self._rows = files.read_jsonl(self.path)
        self._grid = _read_grid(self.out_dir)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """All committed rows, in the order they were written."""
        return list(self._rows)

    def done_ids(self, *, include_failed: bool = True) -> set[str]:
        """Run ids that already have a row (``status == "failed"`` ones only if ``include_failed``)."""
        return {r["run_id"] for r in self._rows if include_failed or r.get("status") != "failed"}

    def write_curve(self, run_id: str, rows: list[dict[str, Any]]) -> None:
        """``curves/<run_id>.jsonl``: the run's logged rows (step, loss, lr, …), written atomically."""
        if self.writer:
            files.atomic_write_text(self.out_dir / CURVES / f"{run_id}.jsonl",
                               "".join(json.dumps(r) + "\n" for r in rows))

    def commit(self, new_rows: list[dict[str, Any]]) -> None:
        """Add ``new_rows`` (replacing older rows of the same run ids) in one atomic file replace."""
        ids = {r["run_id"] for r in new_rows}
        self._rows = [r for r in self._rows if r["run_id"] not in ids] + list(new_rows)
        if self.writer:
            files.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self._rows))

    def set_grid(self, run_ids: list[str]) -> None:
        """Record ``run_ids`` as the latest grid (``grid.json``, written atomically)."""
        self._grid = list(run_ids)
        if self.writer:
            files.atomic_write_text(self.out_dir / GRID, json.dumps({"run_ids": self._grid}) + "\n")

    def frame(self) -> pd.DataFrame:
        """The table as a DataFrame (one row per run), with the ``in_latest_grid`` column."""
        return _frame(self._rows, self._grid)


def _read_grid(out_dir: Path) -> list[str] | None:
    """The run ids in ``out_dir/grid.json``, or ``None`` when there is none."""
    try:
        return list(json.loads((out_dir / GRID).read_text())["run_ids"])
    except FileNotFoundError:
        return None


def _frame(rows: list[dict[str, Any]], grid: list[str] | None) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if grid is None:
        df[IN_LATEST_GRID] = True
    else:
        df[IN_LATEST_GRID] = df["run_id"].isin(set(grid)) if "run_id" in df else []
    df[IN_LATEST_GRID] = df[IN_LATEST_GRID].astype(bool)
    for total, own in TOTALS.items():  # rows of runs not grown: their own compute is the total
        if total in df and own in df:
            df[total] = df[total].fillna(df[own])
    return df


def load(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Read a sweep's results table back as a DataFrame: every row ever committed, with a boolean
    column ``in_latest_grid`` (is the run in the grid of the latest ``sweep.run`` on this directory?
    rows of runs since edited out of the grid are ``False``)."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        raise FileNotFoundError(f"no {RESULTS} in {out_dir}: not a sweep output directory")
    return _frame(files.read_jsonl(path), _read_grid(Path(out_dir)))


def load_curve(out_dir: str | os.PathLike, run_id: str) -> pd.DataFrame:
    """One run's loss curve (``curves/<run_id>.jsonl``) as a DataFrame."""
    return pd.DataFrame(files.read_jsonl(Path(out_dir) / CURVES / f"{run_id}.jsonl"))
