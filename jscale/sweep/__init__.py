"""Sweeps: generate grids in Python, train many runs per compiled program, never lose a result.

* Grids: :func:`product`, :func:`zip_`, :func:`isoflop`, the shape rule :func:`shape_for_params`
  (the models' own, :func:`jscale.models.shape_for_params`), and :func:`run_id` (a stable id from the
  resolved config, less where it runs: the mesh, the cache dir).
* Running: :func:`run` groups runs by shape, trains each group as one ``vmap``-ed program (or one run
  at a time, or ``vmap`` where a timed probe finds it clearly faster), and writes
  ``out_dir/results.jsonl``; a rerun skips finished runs. :func:`load` reads the table back, with
  ``in_latest_grid`` marking the runs of the latest grid run into the directory.
* Grown runs: a member with a ``growth`` section brings its source run into the sweep (trained
  once, however many members grow from it); both train as single runs in ``out_dir/runs/`` and the
  grown row records its lineage (:mod:`jscale.sweep.lineage`).
* Scripts: an experiment file defines ``grid(preset)`` and optionally ``analyze(df, out_dir)`` and
  ends with ``jscale.cli.experiment(grid, analyze)``; ``jscale sweep FILE --preset P --out DIR`` runs
  it (:mod:`jscale.cli.script`).
"""

from jscale.sweep.execute import run
from jscale.sweep.grid import InvalidRun, isoflop, product, run_id, shape_for_params, zip_
from jscale.sweep.store import load, load_curve

__all__ = ["InvalidRun", "isoflop", "load", "load_curve", "product", "run", "run_id",
           "shape_for_params", "zip_"]
