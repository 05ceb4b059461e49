"""The results store: ``out_dir/results.jsonl`` (one row per finished run) and ``out_dir/curves/``.

Rows are committed a whole group at a time by writing a new file and ``os.replace``-ing it over the
old one, so a crash at any moment leaves either the old table or the new one — never a torn or
duplicate row — and a resumed sweep recomputes unfinished groups with exactly the members they had.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

RESULTS = "results.jsonl"
CURVES = "curves"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self._rows = _read(self.path)

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
            _atomic_write_text(self.out_dir / CURVES / f"{run_id}.jsonl",
                               "".join(json.dumps(r) + "\n" for r in rows))

    def commit(self, new_rows: list[dict[str, Any]]) -> None:
        """Add ``new_rows`` (replacing older rows of the same run ids) in one atomic file replace."""
        ids = {r["run_id"] for r in new_rows}
        self._rows = [r for r in self._rows if r["run_id"] not in ids] + list(new_rows)
        if self.writer:
            _atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self._rows))

    def frame(self) -> pd.DataFrame:
        """The table as a DataFrame (one row per run)."""
        return pd.DataFrame(self._rows)


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Read a sweep's results table back as a DataFrame."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        raise FileNotFoundError(f"no {RESULTS} in {out_dir}: not a sweep output directory")
    return pd.DataFrame(_read(path))


def load_curve(out_dir: str | os.PathLike, run_id: str) -> pd.DataFrame:
    """One run's loss curve (``curves/<run_id>.jsonl``) as a DataFrame."""
    return pd.DataFrame(_read(Path(out_dir) / CURVES / f"{run_id}.jsonl"))
