"""``jscale fit RESULTS_DIR``: fit a law to a sweep's results table (:mod:`jscale.laws.report`),
print the summary, write ``fit.json`` and PNG plots into the directory."""

from __future__ import annotations

import argparse
import os
import sys

from jscale.laws import report
from jscale.sweep.store import load

#: Default ``--streams``: the results column with ParScale's number of streams P (the model field
#: a ParScale family records).
STREAMS_COLUMN = "model.n_streams"


def add_fit_arguments(fit: argparse.ArgumentParser) -> None:
    """The options of ``jscale fit``."""
    fit.add_argument("results_dir", metavar="RESULTS_DIR", help="a sweep's output directory")
    fit.add_argument("--law", choices=list(report.LAW_CHOICES), default="chinchilla",
                     help="chinchilla: L(N, D) fit (Approach 3); isoflop: parabolas per budget "
                          "(Approach 2); parscale: L(N, P) (default: chinchilla)")
    fit.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                     help="bootstrap resamples of the runs for intervals; 0: none (default 1000)")
    fit.add_argument("--n-params", "--params", dest="n_params", choices=list(report.N_PARAMS),
                     default="non_embedding",
                     help="which parameter count is N: non_embedding, with_head (non-embedding + "
                          "the V×d_model LM head, as C counts it) or total (default non_embedding)")
    fit.add_argument("--loss", default=report.DEFAULT_LOSS, metavar="COLUMN",
                     help="results column fitted as the loss (default final_eval_loss; e.g. "
                          "final_train_loss)")
    fit.add_argument("--include-stale", action="store_true",
                     help="also fit rows of runs not in the sweep's latest grid "
                          "(in_latest_grid == False; default: excluded, with their count)")
    fit.add_argument("--streams", default=STREAMS_COLUMN, metavar="COLUMN",
                     help="results column with ParScale's number of streams P")


def fit_results_dir(results_dir: str | os.PathLike, **kwargs) -> report.Report:
    """:func:`jscale.laws.report.analyze` on ``jscale.sweep.load(results_dir)``, writing into
    ``results_dir``."""
    return report.analyze(load(results_dir), results_dir, **kwargs)


def cmd_fit(args: argparse.Namespace) -> int:
    """Run ``jscale fit``; a bad table or unfittable data exits with status 2 and one line."""
    try:
        fit_results_dir(args.results_dir, law=args.law, bootstrap=args.bootstrap,
                        n_params=args.n_params, loss=args.loss, include_stale=args.include_stale,
                        streams=args.streams)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad table or unfittable data
        print(f"jscale fit: error: {e}", file=sys.stderr)
        return 2
    return 0
