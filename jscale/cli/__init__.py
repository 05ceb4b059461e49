"""The ``jscale`` command: ``jscale train``, ``jscale sweep``, ``jscale presets``, ``jscale fit``; and
:func:`experiment`, the command line of an experiment script (``python experiments/NAME.py``).

Bad arguments and impossible configs exit with status 2 and a one-line reason. argparse lives only in
this package: :mod:`jscale.cli.parser` (the one-line-error parser), :mod:`jscale.cli.script`
(experiment scripts: ``grid``/``analyze``), :mod:`jscale.cli.fit` (``jscale fit``).
"""

from __future__ import annotations

import argparse
import sys

from jscale.cli import script as script_cli
from jscale.cli.parser import Parser
from jscale.cli.script import experiment

__all__ = ["experiment", "main"]


def _build_parser() -> argparse.ArgumentParser:
    from jscale.cli.fit import add_fit_arguments
    from jscale.growth import GRAMMAR, grammar_help
    from jscale.mesh import add_distributed_arguments

    parser = Parser(prog="jscale", description="jscale: JAX scaling-law experiments.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = sub.add_parser("train", help="train one run from a preset",
                           description="Train one run. Rerunning with the same --out resumes from "
                                       "the newest checkpoint.")
    train.add_argument("--preset", required=True, help="preset name (see `jscale presets`)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)")
    train.add_argument("--out", required=True, help="output directory (metrics, checkpoints, summary)")
    train.add_argument("--quiet", action="store_true", help="no progress bar or final summary line")
    train.add_argument("--init-from", metavar="DIR", default=None,
                       help="start from a trained checkpoint: a jscale run directory or a Hugging "
                            "Face directory (config.json + *.safetensors); its parameters are "
                            "copied, the rest (e.g. ParScale's prefixes and aggregator) fresh, the "
                            "optimizer state new")
    train.add_argument("--grow", metavar=GRAMMAR, default=None,
                       help="with --init-from RUN_DIR: grow the run's newest checkpoint into this "
                            "run's model (its shape from --preset/--set) and train on, recording "
                            "the source, the operator and the source's FLOPs (lineage.json; "
                            "total_flops in summary.json). " + grammar_help())
    add_distributed_arguments(train)

    sweep = sub.add_parser("sweep", help="run an experiment script's grid",
                           description="Run the grid an experiment script defines (grid(preset)), "
                                       "then its analyze(df, out_dir). Rerunning resumes.")
    sweep.add_argument("script", help="path of the experiment script, e.g. experiments/lr_sweep.py")
    script_cli.add_sweep_arguments(sweep)

    sub.add_parser("presets", help="list presets with their sizes",
                   description="List the presets with their parameter counts.")

    fit = sub.add_parser("fit", help="fit scaling laws to a sweep's results",
                         description="Fit a law to RESULTS_DIR/results.jsonl, print parameters with "
                                     "bootstrap intervals and compute-optimal N and D, and write "
                                     "fit.json and PNG plots into RESULTS_DIR.")
    add_fit_arguments(fit)
    return parser


def _cmd_train(args) -> int:
    from jscale import presets
    from jscale.config import ConfigError, parse_overrides
    from jscale.mesh import initialize_from_args
    from jscale.train import grown_params_from, init_params_from, train

    try:
        cfg = presets.get(args.preset).override(parse_overrides(args.overrides))
        if args.grow is not None and args.init_from is None:
            raise ConfigError("--grow: needs --init-from RUN_DIR, the run whose newest checkpoint "
                              "it grows")
        initialize_from_args(args)
        init, lineage = None, None
        if args.grow is not None:
            init, lineage = grown_params_from(args.init_from, cfg, args.grow)
        elif args.init_from is not None:
            init = init_params_from(args.init_from, cfg)
        train(cfg, args.out, quiet=args.quiet, init_params=init, lineage=lineage)
    except KeyError as e:  # unknown preset
        print(f"jscale train: error: {e.args[0]}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"jscale train: error: {e}", file=sys.stderr)
        return 2
    return 0  # a diverged run is a result (summary.json says so), not a CLI error


def _cmd_sweep(args) -> int:
    from jscale.config import ConfigError

    try:
        module = script_cli.load_script(args.script)
        return script_cli.run_script(module.grid, getattr(module, "analyze", None), args)
    except ConfigError as e:
        print(f"jscale sweep: error: {e}", file=sys.stderr)
        return 2


def _cmd_presets(args) -> int:
    from jscale import models, presets
    from jscale.config import model_family

    for name in presets.names():
        cfg = presets.get(name)
        m, t = cfg.model, cfg.train
        n = models.count_params(m)
        print(f"{name:12s} {n['total'] / 1e6:7.3f} M params ({n['non_embedding'] / 1e6:.3f} M "
              f"non-embedding)  {model_family(m)}: {models.describe(m)}  T={t.seq_len} "
              f"B={t.batch_size} steps={t.steps}  "
              f"{models.flops_per_token(m, t.seq_len)['training'] / 1e6:.2f} MFLOP/token")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jscale`` console script."""
    args = _build_parser().parse_args(argv)
    if args.command == "fit":
        from jscale.cli.fit import cmd_fit
        return cmd_fit(args)
    return {"train": _cmd_train, "sweep": _cmd_sweep, "presets": _cmd_presets}[args.command](args)
