"""The ``jscale`` command: ``jscale train``, ``jscale sweep``, ``jscale presets``, ``jscale fit``.

Bad arguments and impossible configs exit with status 2 and a one-line reason.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (``jscale train: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jscale", description="jscale: JAX scaling-law experiments.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train one run from a preset",
                           description="Train one run. Rerunning with the same --out resumes from "
                                       "the newest checkpoint.")
    train.add_argument("--preset", required=True, help="preset name (see `jscale presets`)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)")
    train.add_argument("--out", required=True, help="output directory (metrics, checkpoints, summary)")
    train.add_argument("--quiet", action="store_true", help="no progress bar or final summary line")
    from jscale.sharding import add_distributed_arguments
    add_distributed_arguments(train)

    sweep = sub.add_parser("sweep", help="run an experiment script's grid",
                           description="Run the grid an experiment script defines (grid(preset)), "
                                       "then its analyze(df, out_dir). Rerunning resumes.")
    sweep.add_argument("script", help="path of the experiment script, e.g. experiments/lr_sweep.py")
    from jscale.sweep.script import add_sweep_arguments
    add_sweep_arguments(sweep)

    sub.add_parser("presets", help="list presets with their sizes",
                   description="List the presets with their parameter counts.")

    fit = sub.add_parser("fit", help="fit scaling laws to a sweep's results",
                         description="Fit a law to RESULTS_DIR/results.jsonl, print parameters with "
                                     "bootstrap intervals and compute-optimal N and D, and write "
                                     "fit.json and PNG plots into RESULTS_DIR.")
    fit.add_argument("results_dir", metavar="RESULTS_DIR", help="a sweep's output directory")
    fit.add_argument("--law", choices=["chinchilla", "isoflop", "parscale"], default="chinchilla",
                     help="chinchilla: L(N, D) fit (Approach 3); isoflop: parabolas per budget "
                          "(Approach 2); parscale: L(N, P) (default: chinchilla)")
    fit.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                     help="bootstrap resamples of the runs for intervals; 0: none (default 1000)")
    fit.add_argument("--n-params", "--params", dest="n_params",
                     choices=["non_embedding", "with_head", "total"], default="non_embedding",
                     help="which parameter count is N: non_embedding, with_head (non-embedding + "
                          "the V×d_model LM head, as C counts it) or total (default non_embedding)")
    fit.add_argument("--loss", default="final_eval_loss", metavar="COLUMN",
                     help="results column fitted as the loss (default final_eval_loss; e.g. "
                          "final_train_loss)")
    fit.add_argument("--include-stale", action="store_true",
                     help="also fit rows of runs not in the sweep's latest grid "
                          "(in_latest_grid == False; default: excluded, with their count)")
    fit.add_argument("--streams", default="model.n_streams", metavar="COLUMN",
                     help="results column with ParScale's number of streams P")
    return parser


def _cmd_train(args) -> int:
    from jscale import presets
    from jscale.config import ConfigError, parse_overrides
    from jscale.sharding import initialize_from_args
    from jscale.train import train

    try:
        cfg = presets.get(args.preset).override(parse_overrides(args.overrides))
        initialize_from_args(args)
        train(cfg, args.out, quiet=args.quiet)
    except KeyError as e:  # unknown preset
        print(f"jscale train: error: {e.args[0]}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"jscale train: error: {e}", file=sys.stderr)
        return 2
    return 0  # a diverged run is a result (summary.json says so), not a CLI error


def _cmd_sweep(args) -> int:
    from jscale.config import ConfigError
    from jscale.sweep.script import load_script, run_script

    try:
        module = load_script(args.script)
        return run_script(module.grid, getattr(module, "analyze", None), args)
    except ConfigError as e:
        print(f"jscale sweep: error: {e}", file=sys.stderr)
        return 2


def _cmd_presets(args) -> int:
    from jscale import count_params, flops_per_token, presets
    from jscale.config import model_family

    shape_keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "d_state", "expand")
    for name in presets.names():
        cfg = presets.get(name)
        m, t = cfg.model, cfg.train
        n = count_params(m)
        shape = " ".join(f"{k}={getattr(m, k)}" for k in shape_keys if hasattr(m, k))
        print(f"{name:12s} {n['total'] / 1e6:7.3f} M params ({n['non_embedding'] / 1e6:.3f} M "
              f"non-embedding)  {model_family(m)}: {shape}  T={t.seq_len} B={t.batch_size} "
              f"steps={t.steps}  {flops_per_token(m, t.seq_len)['training'] / 1e6:.2f} MFLOP/token")
    return 0


def _cmd_fit(args) -> int:
    from jscale.laws.report import fit_results_dir

    try:
        fit_results_dir(args.results_dir, law=args.law, bootstrap=args.bootstrap,
                        n_params=args.n_params, loss=args.loss, include_stale=args.include_stale,
                        streams=args.streams)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad table or unfittable data
        print(f"jscale fit: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jscale`` console script."""
    args = _build_parser().parse_args(argv)
    return {"train": _cmd_train, "sweep": _cmd_sweep, "presets": _cmd_presets,
            "fit": _cmd_fit}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
