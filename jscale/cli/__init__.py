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
    train.add_argument("--grow-steps", type=int, default=0, metavar="N",
                       help="with --grow random[:G]: blend the new parameters in over the first N "
                            "steps (a factor rising 0 -> 1; new layers compute x + m*block(x))")
    train.add_argument("--grow-optimizer-state", action="store_true",
                       help="with --grow: grow the source's Adam moments with the same operator "
                            "(new entries zero) instead of starting a fresh optimizer state")
    train.add_argument("--learn-steps", type=int, default=None, metavar="N",
                       help="with --grow learn[:G]: train the LiGO expansion this many steps "
                            "before materialising it (default 100)")
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
    from jscale.train import init_params_from, train, with_growth

    try:
        cfg = presets.get(args.preset).override(parse_overrides(args.overrides))
        if args.grow is not None and args.init_from is None:
            raise ConfigError("--grow: needs --init-from RUN_DIR, the run whose newest checkpoint "
                              "it grows")
        initialize_from_args(args)
        grow_opts = {"grow_steps": args.grow_steps,
                     "grow_optimizer_state": args.grow_optimizer_state,
                     "learn_steps": args.learn_steps}
        if args.grow is None and (args.grow_steps or args.grow_optimizer_state
                                  or args.learn_steps is not None):
            raise ConfigError("--grow-steps, --grow-optimizer-state and --learn-steps go with "
                              "--grow")
        if args.grow is not None:
            cfg = with_growth(cfg, args.init_from, args.grow, **grow_opts)
            train(cfg, args.out, quiet=args.quiet, grow_from=args.init_from)
        else:
            init = None if args.init_from is None else init_params_from(args.init_from, cfg)
            train(cfg, args.out, quiet=args.quiet, init_params=init)
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
