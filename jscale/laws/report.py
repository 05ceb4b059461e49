"""From a sweep's results table to fitted laws, a printed summary, ``fit.json`` and plots — what
``jscale fit RESULTS_DIR`` runs, usable from an experiment's ``analyze(df, out_dir)`` too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jscale.laws import allocation, fitting, uncertainty

LAW_CHOICES = ("chinchilla", "isoflop", "parscale")
#: Loss column fitted, in order of preference.
LOSS_COLUMNS = ("final_eval_loss", "final_train_loss")
#: Column with the number of ParScale streams P.
STREAMS_COLUMN = "model.n_streams"


class FitInputError(ValueError):
    """The results table cannot be fitted as asked (missing columns, too few usable runs)."""


def usable_runs(df: pd.DataFrame, *, n_params: str = "non_embedding") -> pd.DataFrame:
    """The finished, non-diverged runs with a finite positive loss, as columns ``N`` (parameters:
    ``n_params_non_embedding`` or ``n_params`` for ``n_params="total"``), ``D`` (tokens), ``loss``,
    ``budget`` (the IsoFLOP budget, NaN if none), ``flops_per_token`` and the original columns."""
    if n_params not in ("non_embedding", "total"):
        raise FitInputError(f"n_params: expected 'non_embedding' or 'total' (got {n_params!r})")
    ncol = "n_params_non_embedding" if n_params == "non_embedding" else "n_params"
    loss_col = next((c for c in LOSS_COLUMNS if c in df and df[c].notna().any()), None)
    missing = [c for c in (ncol, "tokens") if c not in df]
    if missing or loss_col is None:
        raise FitInputError(f"results table lacks {missing or list(LOSS_COLUMNS)}: not a jscale "
                            f"sweep results table")
    ok = pd.Series(True, index=df.index)
    if "status" in df:
        ok &= df["status"].fillna("ok") == "ok"
    if "diverged" in df:
        ok &= ~df["diverged"].fillna(False).astype(bool)
    loss = pd.to_numeric(df[loss_col], errors="coerce")
    ok &= np.isfinite(loss) & (loss > 0)
    runs = df[ok].copy()
    runs["N"] = runs[ncol].astype(float)
    runs["D"] = runs["tokens"].astype(float)
    runs["loss"] = loss[ok].astype(float)
    runs["loss_column"] = loss_col
    budget = runs["budget"] if "budget" in runs else pd.Series(np.nan, index=runs.index)
    runs["budget"] = pd.to_numeric(budget, errors="coerce").astype(float)
    return runs


def report_budgets(runs: pd.DataFrame) -> np.ndarray:
    """Budgets for the compute-optimal table: the sweep's IsoFLOP budgets (or three log-spaced
    values across the runs' FLOPs), then 10× and 100× the largest."""
    b = np.unique(runs["budget"].dropna().to_numpy(float))
    if b.size == 0:
        flops = (runs["flops"] if "flops" in runs else 6.0 * runs["N"] * runs["D"]).to_numpy(float)
        b = np.geomspace(flops.min(), flops.max(), 3)
    return np.concatenate([b, [b.max() * 10.0, b.max() * 100.0]])


def _fpt_from_runs(runs: pd.DataFrame) -> Callable | None:
    if "flops_per_token" not in runs or runs["N"].nunique() < 2:
        return None
    return allocation.interpolated_flops_per_token(runs["N"], runs["flops_per_token"])


def _fmt_interval(v: float, iv: Sequence[float] | None, fmt: str) -> str:
    s = format(v, fmt)
    return s if iv is None else f"{s}  [{format(iv[0], fmt)}, {format(iv[1], fmt)}]"


def analyze(df: pd.DataFrame, out_dir: str | os.PathLike, *, law: str = "chinchilla",
            bootstrap: int = uncertainty.BOOTSTRAP_RESAMPLES, n_params: str = "non_embedding",
            streams: str = STREAMS_COLUMN, seed: int = 0, ci: float = 0.95,
            echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Fit ``law`` ("chinchilla": Approach 3; "isoflop": Approach 2; "parscale") to a sweep's
    results ``df``, echo a summary (parameters with ``ci`` bootstrap intervals, compute-optimal N
    and D for a few budgets), and write ``out_dir/fit.json`` and PNG plots. Returns the JSON dict."""
    from jscale import plots
    if law not in LAW_CHOICES:
        raise FitInputError(f"law: expected one of {LAW_CHOICES} (got {law!r})")
    if bootstrap < 0 or bootstrap == 1:
        raise FitInputError(f"bootstrap: number of resamples must be 0 (off) or ≥ 2 "
                            f"(got {bootstrap})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = usable_runs(df, n_params=n_params)
    if len(runs) == 0:
        raise FitInputError("no usable runs (finished, not diverged, with a finite loss)")
    summary: dict[str, Any] = {"law": law, "n_runs": int(len(runs)),
                               "loss_column": str(runs["loss_column"].iloc[0]),
                               "n_params": n_params, "plots": []}
    echo(f"{len(runs)} usable runs of {len(df)}; loss = {summary['loss_column']}, "
         f"N = {'non-embedding' if n_params == 'non_embedding' else 'total'} parameters, "
         f"D = tokens")
    budgets = report_budgets(runs)
    if law == "parscale":
        summary.update(_parscale(runs, out, streams, bootstrap, seed, ci, echo, plots))
    elif law == "isoflop":
        summary.update(_isoflop(runs, out, budgets, bootstrap, seed, ci, echo, plots))
    else:
        summary.update(_chinchilla(runs, out, budgets, bootstrap, seed, ci, echo, plots))
    path = out / "fit.json"
    path.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    echo(f"wrote {path}" + "".join(f", {p}" for p in summary["plots"]))
    return summary


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
    return f"   [{boot.N_opt[i][0]:9.3g}, {boot.N_opt[i][1]:9.3g}]"


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


def _chinchilla(runs, out, budgets, n_boot, seed, ci, echo, plots) -> dict[str, Any]:
    if runs["N"].nunique() < 2 or runs["D"].nunique() < 2:
        raise FitInputError("chinchilla: need runs with ≥ 2 distinct model sizes and token counts")
    result = fitting.fit_chinchilla(runs["N"], runs["D"], runs["loss"])
    boot = (uncertainty.bootstrap(result, n_boot, seed=seed, ci=ci, budgets=budgets)
            if n_boot else None)
    _echo_params(result, boot, echo)
    echo(f"  exponents: N_opt ∝ C^{result.a:.4f}, D_opt ∝ C^{result.b:.4f}")
    fpt = _fpt_from_runs(runs)
    N_num, D_num = result.compute_optimal(budgets, fpt) if fpt else (None, None)
    echo("compute-optimal allocation (closed form under C = 6ND"
         + ("; numeric under the runs' own FLOPs per token" if fpt else "") + "):")
    head = f"  {'C (FLOPs)':>10s} {'N_opt':>10s} {'D_opt':>10s} {'N_opt interval':>23s}"
    echo(head + (f" {'N_opt(num)':>10s} {'D_opt(num)':>10s}" if fpt else ""))
    table = []
    for i, C in enumerate(budgets):
        N, D = float(result.N_opt(C)), float(result.D_opt(C))
        row = {"C": float(C), "N_opt": N, "D_opt": D}
        line = f"  {C:10.3g} {N:10.3g} {D:10.3g}"
        line += _add_opt_interval(row, boot, i) if boot is not None else " " * 26
        if fpt:
            row["N_opt_numeric"], row["D_opt_numeric"] = float(N_num[i]), float(D_num[i])
            line += f" {N_num[i]:10.3g} {D_num[i]:10.3g}"
        table.append(row)
        echo(line)
    res: dict[str, Any] = {"fit": result.to_dict(), "compute_optimal": table}
    if boot is not None:
        res["bootstrap"] = boot.to_dict()
    res["plots"] = [plots.fit_vs_observed(result, out / "fit_vs_observed.png")]
    iso = _try_isoflop(runs)
    if iso is not None:
        res["plots"].append(plots.isoflop_curves(iso, out / "isoflop.png", chinchilla=result))
    res["plots"].append(plots.frontier(out / "frontier.png", iso=iso, chinchilla=result,
                                       chinchilla_boot=boot, budgets=budgets))
    return res


def _try_isoflop(runs):
    sel = runs["budget"].notna()
    if sel.sum() < 6:
        return None
    try:
        return allocation.fit_isoflop(*(runs.loc[sel, k] for k in ("N", "D", "loss", "budget")))
    except ValueError:
        return None


def _isoflop(runs, out, budgets, n_boot, seed, ci, echo, plots) -> dict[str, Any]:
    sel = runs["budget"].notna()
    if not sel.any():
        raise FitInputError("isoflop: no run has a budget (train.flops_budget); run an IsoFLOP "
                            "grid (jscale.sweep.isoflop) or use --law chinchilla")
    try:
        iso = allocation.fit_isoflop(*(runs.loc[sel, k] for k in ("N", "D", "loss", "budget")))
    except ValueError as e:
        raise FitInputError(f"isoflop: {e}") from None
    boot = (allocation.bootstrap_isoflop(iso, n_boot, seed=seed, ci=ci, budgets=budgets)
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
    echo("compute-optimal allocation (Approach 2 power laws):")
    echo(f"  {'C (FLOPs)':>10s} {'N_opt':>10s} {'D_opt':>10s} {'N_opt interval':>23s}")
    table = []
    for i, C in enumerate(budgets):
        row = {"C": float(C), "N_opt": float(iso.N_opt(C)), "D_opt": float(iso.D_opt(C))}
        line = f"  {C:10.3g} {row['N_opt']:10.3g} {row['D_opt']:10.3g}"
        if boot is not None:
            line += _add_opt_interval(row, boot, i)
        table.append(row)
        echo(line)
    res: dict[str, Any] = {"fit": iso.to_dict(), "compute_optimal": table}
    if boot is not None:
        res["bootstrap"] = boot.to_dict()
    res["plots"] = [plots.isoflop_curves(iso, out / "isoflop.png"),
                    plots.frontier(out / "frontier.png", iso=iso, iso_boot=boot, budgets=budgets)]
    return res


def _parscale(runs, out, streams, n_boot, seed, ci, echo, plots) -> dict[str, Any]:
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
    return res


def fit_results_dir(results_dir: str | os.PathLike, **kwargs) -> dict[str, Any]:
    """:func:`analyze` on ``jscale.sweep.load(results_dir)``, writing into ``results_dir``."""
    from jscale.sweep import load
    return analyze(load(results_dir), results_dir, **kwargs)
