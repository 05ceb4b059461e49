"""From a sweep's results table to fitted laws, a printed summary, ``fit.json`` and plots — what
``jscale fit RESULTS_DIR`` runs, usable from an experiment's ``analyze(df, out_dir)`` too.

:func:`analyze` returns a :class:`Report`: the fit objects themselves (a
:class:`~jscale.laws.ChinchillaFit`, :class:`~jscale.laws.IsoFlopFit` or ParScale
:class:`~jscale.laws.FitResult`, their bootstrap, the runs they were fitted on), so a caller that
prints or plots more reuses them instead of fitting again. The table is a plain ``pandas`` frame
(e.g. ``jscale.sweep.load(dir)``); this module reads no files but its own outputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jscale.laws import allocation, fitting, isoflop, plots, uncertainty

LAW_CHOICES = ("chinchilla", "isoflop", "parscale")
#: Parameter-count conventions for N: column used (``with_head`` falls back to
#: ``n_params_non_embedding + model.vocab_size × model.d_model`` where the column is missing).
N_PARAMS = {"non_embedding": "n_params_non_embedding", "with_head": "n_params_with_head",
            "total": "n_params", "active": "n_params_active"}
N_PARAMS_TEXT = {"non_embedding": "non-embedding parameters",
                 "with_head": "non-embedding parameters + the LM head (V × d_model)",
                 "total": "total parameters",
                 "active": "active parameters (those a token uses; = total for dense models)"}
#: Loss column fitted by default: the final validation loss.
DEFAULT_LOSS = "final_eval_loss"
#: Column that marks rows of runs no longer in the sweep's latest grid (missing: all current).
LATEST_GRID_COLUMN = "in_latest_grid"
#: FLOP conventions of a compute-optimal allocation: the runs' own training FLOPs per token (the
#: convention of their IsoFLOP budgets), or the closed form under ``C = 6ND``.
RUNS_FLOPS = "runs_flops_per_token"
FLOPS_TEXT = {RUNS_FLOPS: "C = flops_per_token(N)·D, the runs' own training FLOPs per token "
                          "(jscale's count)",
              uncertainty.SIX_ND: "C = 6·N·D (closed form)"}


class FitInputError(ValueError):
    """The results table cannot be fitted as asked (missing columns, too few usable runs)."""


@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`analyze` fitted, echoed and wrote.

    ``fit``: the fitted law (``law="chinchilla"``: a :class:`~jscale.laws.ChinchillaFit`;
    ``"isoflop"``: an :class:`~jscale.laws.IsoFlopFit`; ``"parscale"``: a
    :class:`~jscale.laws.FitResult`); ``bootstrap``: its bootstrap (``None`` with ``bootstrap=0``);
    ``runs``: the :func:`usable_runs` it was fitted on; ``budgets``: the budgets of the
    compute-optimal table; ``flops_per_token``: the runs' own FLOPs per token
    (:func:`runs_flops_per_token`; ``None`` where the table lacks them); ``approach2``: the
    Approach 2 fit drawn beside a Chinchilla fit (``None`` if the runs allow none); ``summary``: the
    JSON dict written to ``fit.json`` (``summary["plots"]``: the PNGs written)."""

    law: str
    fit: Any
    bootstrap: Any
    runs: pd.DataFrame = dataclasses.field(repr=False)
    budgets: np.ndarray
    flops_per_token: Callable[[np.ndarray], np.ndarray] | None = dataclasses.field(repr=False)
    summary: dict[str, Any] = dataclasses.field(repr=False)
    approach2: Any = None


def usable_runs(df: pd.DataFrame, *, n_params: str = "non_embedding", loss: str = DEFAULT_LOSS,
                include_stale: bool = False) -> pd.DataFrame:
    """The finished, non-diverged runs with a finite positive ``loss`` (default the final eval loss,
    ``final_eval_loss``; e.g. ``loss="final_train_loss"``), as columns ``N`` (parameters in the
    convention ``n_params``: ``"non_embedding"``, ``"with_head"`` — non-embedding plus the LM head's
    ``vocab_size × d_model``, tied or not, as C counts it (Porian et al. 2024) — or ``"total"``),
    ``D`` (tokens), ``loss``, ``loss_column``, ``budget`` (the IsoFLOP budget, NaN if none) and the
    original columns.

    Rows with ``in_latest_grid == False`` (runs of an older grid of the sweep) are excluded with a
    warning unless ``include_stale``; their count is in ``runs.attrs["n_stale_excluded"]``."""
    if n_params not in N_PARAMS:
        raise FitInputError(f"n_params: expected one of {list(N_PARAMS)} (got {n_params!r})")
    if "tokens" not in df or (n_params != "with_head" and N_PARAMS[n_params] not in df):
        missing = [c for c in ("tokens", N_PARAMS[n_params]) if c not in df]
        raise FitInputError(f"results table lacks {missing}: not a jscale sweep results table")
    if loss not in df or not df[loss].notna().any():
        raise FitInputError(f"loss: the results table has no {loss!r} values"
                            + (" (runs evaluated? pass loss='final_train_loss' / --loss "
                               "final_train_loss to fit the training loss)"
                               if loss != "final_train_loss" else ""))
    N = _n_params_column(df, n_params)
    ok = pd.Series(True, index=df.index)
    if "status" in df:
        ok &= df["status"].fillna("ok") == "ok"
    if "diverged" in df:
        ok &= ~df["diverged"].fillna(False).astype(bool)
    y = pd.to_numeric(df[loss], errors="coerce")
    ok &= np.isfinite(y) & (y > 0) & np.isfinite(N)
    stale = (df[LATEST_GRID_COLUMN].eq(False) if LATEST_GRID_COLUMN in df
             else pd.Series(False, index=df.index))
    n_stale = int((stale & ok).sum()) if not include_stale else 0
    if n_stale:
        warnings.warn(f"usable_runs: excluded {n_stale} run(s) not in the sweep's latest grid "
                      f"({LATEST_GRID_COLUMN} == False); include_stale=True (jscale fit "
                      f"--include-stale) keeps them", UserWarning, stacklevel=2)
        ok &= ~stale
    runs = df[ok].copy()
    runs["N"] = N[ok].astype(float)
    runs["D"] = runs["tokens"].astype(float)
    runs["loss"] = y[ok].astype(float)
    runs["loss_column"] = loss
    budget = runs["budget"] if "budget" in runs else pd.Series(np.nan, index=runs.index)
    runs["budget"] = pd.to_numeric(budget, errors="coerce").astype(float)
    runs.attrs["n_stale_excluded"] = n_stale
    return runs


def _n_params_column(df: pd.DataFrame, n_params: str) -> pd.Series:
    col = N_PARAMS[n_params]
    have = (pd.to_numeric(df[col], errors="coerce") if col in df
            else pd.Series(np.nan, index=df.index, dtype=float))
    if n_params != "with_head" or have.notna().all():
        return have.astype(float)
    parts = ("n_params_non_embedding", "model.vocab_size", "model.d_model")
    missing = [c for c in parts if c not in df]
    if missing:
        raise FitInputError(f"n_params='with_head': the results table has no {col!r} column and "
                            f"lacks {missing} to compute it")
    ne, V, d = (pd.to_numeric(df[c], errors="coerce") for c in parts)
    return have.fillna(ne + V * d).astype(float)


def runs_flops_per_token(runs: pd.DataFrame) -> Callable[[np.ndarray], np.ndarray]:
    """Training FLOPs per token as a function of N, from the runs' own ``(N, flops_per_token)`` pairs
    (log-log interpolated, extrapolated with the end slopes): the FLOP convention of their budgets,
    ``C = flops_per_token(N)·D``, in the N convention ``runs`` was made with (:func:`usable_runs`).
    Pass it to ``ChinchillaFit.compute_optimal(C, fpt)`` and ``laws.bootstrap(...,
    flops_per_token=fpt)``. Raises :class:`FitInputError` without a ``flops_per_token`` column or with
    fewer than 2 distinct N."""
    if "flops_per_token" not in runs or "N" not in runs:
        raise FitInputError("runs_flops_per_token: needs columns N and flops_per_token "
                            "(a usable_runs table of a jscale sweep)")
    if runs["N"].nunique() < 2:
        raise FitInputError("runs_flops_per_token: needs runs of ≥ 2 distinct sizes N")
    return allocation.interpolated_flops_per_token(runs["N"], runs["flops_per_token"])


def report_budgets(runs: pd.DataFrame) -> np.ndarray:
    """Budgets for the compute-optimal table: the sweep's IsoFLOP budgets (or three log-spaced
    values across the runs' FLOPs), then 10× and 100× the largest."""
    b = np.unique(runs["budget"].dropna().to_numpy(float))
    if b.size == 0:
        flops = (runs["flops"] if "flops" in runs else 6.0 * runs["N"] * runs["D"]).to_numpy(float)
        b = np.geomspace(flops.min(), flops.max(), 3)
    return np.concatenate([b, [b.max() * 10.0, b.max() * 100.0]])


def _fpt_from_runs(runs: pd.DataFrame) -> Callable | None:
    try:
        return runs_flops_per_token(runs)
    except FitInputError:
        return None


def _fmt_interval(v: float, iv: Sequence[float] | None, fmt: str) -> str:
    s = format(v, fmt)
    return s if iv is None else f"{s}  [{format(iv[0], fmt)}, {format(iv[1], fmt)}]"


def analyze(df: pd.DataFrame, out_dir: str | os.PathLike, *, law: str = "chinchilla",
            bootstrap: int = uncertainty.BOOTSTRAP_RESAMPLES, n_params: str = "non_embedding",
            loss: str = DEFAULT_LOSS, include_stale: bool = False,
            streams: str | None = None, seed: int = 0, ci: float = 0.95,
            approach2: isoflop.IsoFlopFit | None = None,
            echo: Callable[[str], Any] = print) -> Report:
    """Fit ``law`` ("chinchilla": Approach 3; "isoflop": Approach 2; "parscale") to a sweep's
    results ``df`` (the runs :func:`usable_runs` keeps: ``n_params``, ``loss``, ``include_stale``),
    echo a summary (parameters with ``ci`` bootstrap intervals, compute-optimal N and D for a few
    budgets, each table naming its FLOP convention: the runs' own FLOPs per token, with ``C = 6ND``
    as a labelled secondary), and write ``out_dir/fit.json`` and PNG plots. Returns the
    :class:`Report` (the fit objects and the JSON dict).

    ``streams`` (``law="parscale"``): the column with the number of streams P. ``approach2``
    (``law="chinchilla"``): an Approach 2 fit of the same runs (e.g. an earlier ``law="isoflop"``
    report's ``fit``) to draw beside the Chinchilla fit instead of fitting it again."""
    if law not in LAW_CHOICES:
        raise FitInputError(f"law: expected one of {LAW_CHOICES} (got {law!r})")
    if bootstrap < 0 or bootstrap == 1:
        raise FitInputError(f"bootstrap: number of resamples must be 0 (off) or ≥ 2 "
                            f"(got {bootstrap})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():                  # the count is echoed below instead
        warnings.simplefilter("ignore", UserWarning)
        runs = usable_runs(df, n_params=n_params, loss=loss, include_stale=include_stale)
    if len(runs) == 0:
        raise FitInputError("no usable runs (finished, not diverged, with a finite loss)")
    n_stale = runs.attrs.get("n_stale_excluded", 0)
    summary: dict[str, Any] = {"law": law, "n_runs": int(len(runs)), "loss_column": loss,
                               "n_params": n_params, "n_stale_excluded": n_stale,
                               "include_stale": include_stale, "plots": []}
    echo(f"{len(runs)} usable runs of {len(df)}; loss = {loss}, N = {N_PARAMS_TEXT[n_params]}, "
         f"D = tokens")
    if n_stale:
        echo(f"  excluded {n_stale} run(s) not in the sweep's latest grid ({LATEST_GRID_COLUMN} == "
             f"False; --include-stale keeps them)")
    budgets = report_budgets(runs)
    fpt = _fpt_from_runs(runs)
    if law == "parscale":
        res, result, boot, iso = _parscale(runs, out, streams, bootstrap, seed, ci, echo)
    elif law == "isoflop":
        res, result, boot, iso = _isoflop(runs, out, budgets, fpt, bootstrap, seed, ci, echo)
    else:
        res, result, boot, iso = _chinchilla(runs, out, budgets, fpt, bootstrap, seed, ci, echo,
                                             approach2)
    summary.update(res)
    path = out / "fit.json"
    path.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    echo(f"wrote {path}" + "".join(f", {p}" for p in summary["plots"]))
    return Report(law=law, fit=result, bootstrap=boot, runs=runs, budgets=budgets,
                  flops_per_token=fpt, summary=summary, approach2=iso)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _add_opt_interval(row: dict[str, Any], boot, i: int) -> str:
    """Add budget ``i``'s bootstrap intervals of N_opt and D_opt to ``row``; return the table text."""
    row["N_opt_interval"] = boot.N_opt[i].tolist()
    row["D_opt_interval"] = boot.D_opt[i].tolist()
    return (f"   [{boot.N_opt[i][0]:9.3g}, {boot.N_opt[i][1]:9.3g}]"
            f"   [{boot.D_opt[i][0]:9.3g}, {boot.D_opt[i][1]:9.3g}]")


def _flops_convention(name: str) -> dict[str, str]:
    return {"name": name, "description": FLOPS_TEXT[name]}


def _echo_params(result, boot, echo) -> None:
    echo(f"{result.law.formula}   (Huber δ={result.delta:g} on log loss; {result.n_points} runs, "
         f"{result.n_converged}/{result.n_starts} starts at the best objective "
         f"{result.objective:.6g}; R² {result.r2:.4f}, RMSE {result.rmse:.4g})")
    if boot is not None:
        echo(f"  {boot.ci:.0%} intervals from {boot.n} bootstrap resamples of the runs"
             + (f" ({boot.n_failed} failed)" if boot.n_failed else ""))
    for name, v in result.params.items():
        iv = boot.intervals.get(name) if boot is not None else None
        echo(f"  {name:>6s} = {_fmt_interval(v, iv, '.4g')}")


def _chinchilla(runs, out, budgets, fpt, n_boot, seed, ci, echo, iso):
    if runs["N"].nunique() < 2 or runs["D"].nunique() < 2:
        raise FitInputError("chinchilla: need runs with ≥ 2 distinct model sizes and token counts")
    result = fitting.fit_chinchilla(runs["N"], runs["D"], runs["loss"])
    conv = RUNS_FLOPS if fpt is not None else uncertainty.SIX_ND
    boot = (uncertainty.bootstrap(result, n_boot, seed=seed, ci=ci, budgets=budgets,
                                  flops_per_token=fpt, flops_convention=conv)
            if n_boot else None)
    _echo_params(result, boot, echo)
    echo(f"  exponents (under C = 6ND): N_opt ∝ C^{result.a:.4f}, D_opt ∝ C^{result.b:.4f}")
    N_p, D_p = result.compute_optimal(budgets, fpt) if fpt else (result.N_opt(budgets),
                                                                   result.D_opt(budgets))
    echo(f"compute-optimal allocation, {FLOPS_TEXT[conv]}"
         + (":" if fpt else " (no flops_per_token column):"))
    if fpt:
        echo("  (N_opt 6ND, D_opt 6ND: the closed form under C = 6·N·D, for comparison)")
    head = (f"  {'C (FLOPs)':>10s} {'N_opt':>10s} {'D_opt':>10s} {'N_opt interval':>23s} "
            f"{'D_opt interval':>23s}")
    echo(head + (f" {'N_opt 6ND':>10s} {'D_opt 6ND':>10s}" if fpt else ""))
    table = []
    for i, C in enumerate(budgets):
        row = {"C": float(C), "flops_convention": conv, "N_opt": float(N_p[i]),
               "D_opt": float(D_p[i])}
        line = f"  {C:10.3g} {N_p[i]:10.3g} {D_p[i]:10.3g}"
        line += _add_opt_interval(row, boot, i) if boot is not None else " " * 52
        if fpt:
            N6, D6 = float(result.N_opt(C)), float(result.D_opt(C))
            row["N_opt_6ND"], row["D_opt_6ND"] = N6, D6
            line += f" {N6:10.3g} {D6:10.3g}"
        table.append(row)
        echo(line)
    res: dict[str, Any] = {"fit": result.to_dict(), "flops_convention": _flops_convention(conv),
                           "compute_optimal": table}
    if boot is not None:
        res["bootstrap"] = boot.to_dict()
    res["plots"] = [plots.fit_vs_observed(result, out / "fit_vs_observed.png")]
    if iso is None:
        iso = _try_isoflop(runs)
    if iso is not None:
        res["plots"].append(plots.isoflop_curves(iso, out / "isoflop.png", chinchilla=result))
    res["plots"].append(plots.frontier(out / "frontier.png", iso=iso, chinchilla=result,
                                       chinchilla_boot=boot, budgets=budgets, flops_per_token=fpt,
                                       flops_label=_axis_label(conv)))
    return res, result, boot, iso


def _axis_label(conv: str) -> str:
    return "C = flops_per_token(N)·D, the runs' own" if conv == RUNS_FLOPS else "C = 6ND"


def _try_isoflop(runs):
    sel = runs["budget"].notna()
    if sel.sum() < 6:
        return None
    try:
        return isoflop.fit_isoflop(*(runs.loc[sel, k] for k in ("N", "D", "loss", "budget")))
    except ValueError:
        return None


def _isoflop(runs, out, budgets, fpt, n_boot, seed, ci, echo):
    sel = runs["budget"].notna()
    if not sel.any():
        raise FitInputError("isoflop: no run has a budget (train.flops_budget); run an IsoFLOP "
                            "grid (jscale.sweep.isoflop) or use --law chinchilla")
    try:
        iso = isoflop.fit_isoflop(*(runs.loc[sel, k] for k in ("N", "D", "loss", "budget")))
    except ValueError as e:
        raise FitInputError(f"isoflop: {e}") from None
    boot = (isoflop.bootstrap_isoflop(iso, n_boot, seed=seed, ci=ci, budgets=budgets)
            if n_boot else None)
    echo(f"Approach 2: parabola in log N per budget ({len(iso.budgets)} budgets"
         + ("; skipped " + ", ".join(f"C = {c:g}: {why}" for c, why in iso.skipped.items())
            if iso.skipped else "") + ")")
    if boot is not None:
        echo(f"  {boot.ci:.0%} intervals from {boot.n} bootstrap resamples of each budget's runs"
             + (f" ({boot.n_failed} dropped: a budget left with < 3 sizes or no minimum)"
                if boot.n_failed else ""))
    for C, N, D, lo, o in zip(iso.budgets, iso.N_min, iso.D_min, iso.loss_min, iso.outside,
                              strict=True):
        echo(f"  C = {C:9.3g}: N_min = {N:9.3g}, D_min = {D:9.3g}, loss = {lo:.4f}"
             + ("  (outside the sizes trained: extrapolated)" if o else ""))
    for name, v in (("a", iso.a), ("b", iso.b)):
        iv = boot.intervals[name] if boot is not None else None
        echo(f"  {'N' if name == 'a' else 'D'}_opt ∝ C^{name}: {name} = {_fmt_interval(v, iv, '.4f')}")
    echo(f"compute-optimal allocation (Approach 2 power laws; the runs' budgets: "
         f"{FLOPS_TEXT[RUNS_FLOPS]}):")
    echo(f"  {'C (FLOPs)':>10s} {'N_opt':>10s} {'D_opt':>10s} {'N_opt interval':>23s} "
         f"{'D_opt interval':>23s}")
    table = []
    for i, C in enumerate(budgets):
        row = {"C": float(C), "flops_convention": RUNS_FLOPS, "N_opt": float(iso.N_opt(C)),
               "D_opt": float(iso.D_opt(C))}
        line = f"  {C:10.3g} {row['N_opt']:10.3g} {row['D_opt']:10.3g}"
        if boot is not None:
            line += _add_opt_interval(row, boot, i)
        table.append(row)
        echo(line)
    res: dict[str, Any] = {"fit": iso.to_dict(), "flops_convention": _flops_convention(RUNS_FLOPS),
                           "compute_optimal": table}
    if boot is not None:
        res["bootstrap"] = dict(boot.to_dict(), flops_convention=RUNS_FLOPS)
    res["plots"] = [plots.isoflop_curves(iso, out / "isoflop.png"),
                    plots.frontier(out / "frontier.png", iso=iso, iso_boot=boot, budgets=budgets,
                                   flops_per_token=fpt, flops_label=_axis_label(RUNS_FLOPS))]
    return res, iso, boot, None


def _parscale(runs, out, streams, n_boot, seed, ci, echo):
    if streams is None:
        raise FitInputError("parscale: pass streams=COLUMN, the results column with the number of "
                            "streams P")
    if streams not in runs:
        raise FitInputError(f"parscale: no column {streams!r} with the number of streams P "
                            f"(pass --streams COLUMN)")
    P = pd.to_numeric(runs[streams], errors="coerce").to_numpy(float)
    if not np.all(np.isfinite(P)) or np.any(P < 1):
        raise FitInputError(f"parscale: column {streams!r} must hold stream counts ≥ 1")
    result = fitting.fit_parscale(runs["N"], P, runs["loss"])
    boot = uncertainty.bootstrap(result, n_boot, seed=seed, ci=ci) if n_boot else None
    _echo_params(result, boot, echo)
    gain = {f"{p:g}": float(result.params["k"] * math.log(p) + 1.0) for p in np.unique(P)}
    echo("  equivalent parameter multiplier k·ln P + 1: "
         + ", ".join(f"P={p}: {g:.3f}" for p, g in gain.items()))
    res: dict[str, Any] = {"fit": result.to_dict(), "parameter_multiplier": gain}
    if boot is not None:
        res["bootstrap"] = boot.to_dict()
    res["plots"] = [plots.parscale_curves(result, out / "parscale.png"),
                    plots.fit_vs_observed(result, out / "fit_vs_observed.png")]
    return res, result, boot, None
