"""Experiment scripts: plain Python files that define ``grid(preset) -> list[RunConfig]`` (and may
define ``analyze(df, out_dir)``). They run as ``python experiments/NAME.py --preset P --out DIR``
(the script ends with ``if __name__ == "__main__": jscale.cli.experiment(grid, analyze)``) or as
``jscale sweep experiments/NAME.py --preset P --out DIR``.

``--set KEY=VALUE`` (repeatable) overrides a config field of every run, typed and validated like
``jscale train --set``. A grid that must size its runs with them (a corpus, a tokenizer, a vocabulary)
takes them as ``grid(preset, overrides)``; they are applied to every run it returns either way.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from jscale.cli.parser import Parser
from jscale.config import ConfigError, parse_overrides
from jscale.mesh import add_distributed_arguments, initialize_from_args, is_primary


def load_script(path: str | Path) -> ModuleType:
    """Import an experiment script by path; it must define ``grid``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"script: no such file {str(path)!r}")
    spec = importlib.util.spec_from_file_location(f"jscale_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "grid", None)):
        raise ConfigError(f"script: {path} defines no grid(preset) function")
    return module


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``jscale sweep`` and ``python experiments/NAME.py``."""
    parser.add_argument("--preset", required=True, help="the script's grid preset (e.g. cpu, gpu)")
    parser.add_argument("--out", required=True, help="sweep output directory (results.jsonl, ...)")
    parser.add_argument("--strategy", default="auto", choices=["auto", "vmap", "sequential"])
    parser.add_argument("--strategy-cache", default=None, choices=["sweep", "global"],
                        help="where 'auto' keeps probe results: the sweep's strategies.json only "
                             "(default; or $JSCALE_STRATEGY_CACHE), or also "
                             "$JSCALE_CACHE/strategy_probe.json, shared by every sweep")
    parser.add_argument("--max-group-size", type=int, default=None,
                        help="most runs per compiled program (default: what fits in memory)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field of every run (repeatable), e.g. "
                             "--set data.path=corpus.jsonl")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or group summaries")
    add_distributed_arguments(parser)


def build_grid(grid: Callable, preset: str, overrides: dict[str, str]) -> list:
    """``grid(preset)``, or ``grid(preset, overrides)`` if it takes them, with ``overrides`` applied
    to every run it returns (an :class:`~jscale.sweep.grid.InvalidRun` stays as it is)."""
    from jscale.sweep.grid import InvalidRun

    takes = len(inspect.signature(grid).parameters) >= 2
    runs = grid(preset, dict(overrides)) if takes else grid(preset)
    if not overrides:
        return list(runs)
    return [r if isinstance(r, InvalidRun) else r.override(overrides) for r in runs]


def run_script(grid: Callable, analyze: Callable | None, args: argparse.Namespace) -> int:
    """Build the grid for ``args.preset``, run it into ``args.out``, then ``analyze`` the table."""
    from jscale.sweep.execute import run

    initialize_from_args(args)
    runs = build_grid(grid, args.preset, parse_overrides(getattr(args, "overrides", None) or []))
    df = run(runs, args.out, strategy=args.strategy, max_group_size=args.max_group_size,
             progress=not args.quiet, strategy_cache=args.strategy_cache)
    n_failed = int((df["status"] == "failed").sum())
    if not is_primary():
        return 0
    if analyze is not None:
        analyze(df, Path(args.out))
    print(f"jscale sweep: {len(df)} runs ({n_failed} failed) in {args.out}/results.jsonl",
          file=sys.stderr)
    return 0


def experiment(grid: Callable, analyze: Callable | None = None, argv: list[str] | None = None
               ) -> None:
    """Command line of an experiment script (``python experiments/NAME.py --preset P --out DIR``):
    parse ``argv`` (default ``sys.argv[1:]``), run the grid, ``analyze`` the table, and exit."""
    parser = Parser(description=(grid.__doc__ or "").strip().splitlines()[0] if grid.__doc__
                     else None)
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    try:
        sys.exit(run_script(grid, analyze, args))
    except ConfigError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
