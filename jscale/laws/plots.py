"""Figures of fitted scaling laws, written as PNG files.

Each function takes fitted objects from :mod:`jscale.laws` and a path, draws one figure with
labelled log-scale axes and returns the path. Figures are built on ``matplotlib.figure.Figure``
directly (Agg canvas): nothing touches pyplot's global state or needs a display.

* :func:`isoflop_curves` — loss vs N for each budget, Approach 2's parabolas and their minima.
* :func:`frontier` — compute-optimal N_opt(C) and D_opt(C): Approach 2 minima and power laws,
  Approach 3's allocation in the same FLOP convention, bootstrap bands (:func:`frontier_data`).
* :func:`fit_vs_observed` — predicted vs observed loss for any fit.
* :func:`parscale_curves` — loss vs N for each number of streams P, with the fitted law.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from jscale.laws.uncertainty import allocation_samples, percentile_interval

_INPUT_LABELS = {"N": "parameters N", "D": "tokens D", "P": "streams P"}
#: Figure resolution of the written PNGs.
DPI = 150
_CMAP = "viridis"


def _new(ncols: int = 1, width: float = 6.4, height: float = 4.6):
    fig = Figure(figsize=(width * ncols, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
    return fig, axes


def _save(fig: Figure, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _sci(x: float) -> str:
    """1.2e+21 → '1.2e21' (compact legend labels)."""
    m, e = f"{x:.2g}".split("e") if "e" in f"{x:.2g}" else (f"{x:.2g}", None)
    return m if e is None else f"{m}e{int(e)}"


def _budget_colors(budgets: np.ndarray):
    norm = LogNorm(vmin=float(np.min(budgets)), vmax=float(np.max(budgets)) * 1.0001)
    import matplotlib
    cmap = matplotlib.colormaps[_CMAP]
    return lambda c: cmap(0.1 + 0.8 * norm(c)), norm, cmap


def isoflop_curves(iso, path: str | os.PathLike, *, chinchilla=None,
                   title: str = "IsoFLOP profiles (Approach 2)") -> str:
    """Final loss vs parameters for each compute budget: the runs (dots), the parabola in log N
    fitted to them (line) and its minimum (star). With ``chinchilla`` (an Approach-3
    :class:`~jscale.laws.ChinchillaFit`), its prediction along each IsoFLOP is drawn dashed."""
    runs = iso.runs
    color, norm, cmap = _budget_colors(iso.budgets)
    fig, (ax,) = _new()
    for i, C in enumerate(iso.budgets):
        sel = runs["budget"] == C
        N, loss, D = runs["N"][sel], runs["loss"][sel], runs["D"][sel]
        c = color(C)
        ax.scatter(N, loss, color=c, s=22, zorder=3, label=f"C = {_sci(C)} FLOPs")
        x = np.linspace(np.log(N.min()) - 0.15, np.log(N.max()) + 0.15, 200)
        c0, c1, c2 = iso.parabolas[i]
        ax.plot(np.exp(x), c0 + c1 * x + c2 * x * x, color=c, lw=1.5)
        if chinchilla is not None:
            # along the IsoFLOP, tokens scale like the runs' own D(N) (log-log line)
            k1, k0 = np.polyfit(np.log(N), np.log(D), 1) if len(N) > 1 else (-1.0, np.log(D[0]))
            ax.plot(np.exp(x), chinchilla.predict(np.exp(x), np.exp(k0 + k1 * x)), color=c,
                    lw=1.0, ls="--")
        ax.scatter([iso.N_min[i]], [iso.loss_min[i]], marker="*", s=160, color=c,
                   edgecolor="black", linewidth=0.7, zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss (nats/token)")
    ax.set_title(title + f":  $N_{{opt}} \\propto C^{{{iso.a:.3f}}}$")
    handles, labels = ax.get_legend_handles_labels()
    extra = "★ parabola minimum" + ("; dashed: Approach 3 fit" if chinchilla is not None else "")
    ax.legend(handles, labels, fontsize=8, title=extra, title_fontsize=8, loc="best")
    return _save(fig, path)


#: Budgets at which Approach 3's bootstrap band is solved numerically (under a flops_per_token).
BAND_POINTS = 25
#: Axis label of the FLOP convention when no ``flops_label`` is given.
DEFAULT_FLOPS_LABELS = {False: "C = 6ND", True: "C = flops_per_token(N)·D"}


def frontier_data(*, iso=None, iso_boot=None, chinchilla=None, chinchilla_boot=None,
                  budgets: Sequence[float] | None = None, flops_per_token=None,
                  flops_label: str | None = None) -> dict:
    """What :func:`frontier` draws, as arrays: ``{"C", "convention", "approach2": {...},
    "approach3": {...}}``, each approach with ``N``, ``D`` (its curves over ``C``), a legend
    ``label`` and, with a bootstrap, ``band_C``, ``band_N``, ``band_D`` (``(len(band_C), 2)``).

    Every curve is in one FLOP convention, that of the points: ``flops_per_token`` (training FLOPs
    per token as a function of N, e.g. :func:`jscale.laws.report.runs_flops_per_token` — the
    convention of an IsoFLOP sweep's budgets) or, when None, ``C = 6ND``. Approach 3's allocation is
    then solved numerically under it (``ChinchillaFit.compute_optimal``), not taken from the 6ND
    closed form. ``flops_label`` names the convention (default "C = 6ND" /
    "C = flops_per_token(N)·D")."""
    if iso is None and chinchilla is None:
        raise ValueError("frontier: pass iso= (Approach 2) and/or chinchilla= (Approach 3)")
    label = flops_label or DEFAULT_FLOPS_LABELS[flops_per_token is not None]
    if budgets is None:
        if iso is not None:
            budgets = iso.budgets
        else:
            N, D = chinchilla.inputs["N"], chinchilla.inputs["D"]
            budgets = (6.0 * N if flops_per_token is None else flops_per_token(N)) * D
    b = np.asarray(budgets, float)
    C = np.geomspace(b.min() / 10.0, b.max() * 10.0, 100)
    out: dict = {"C": C, "convention": label}
    if iso is not None:
        a2 = {"N": iso.N_opt(C), "D": iso.D_opt(C), "N_min": iso.N_min, "D_min": iso.D_min,
              "budgets": iso.budgets, "a": iso.a, "b": iso.b}
        if iso_boot is not None:
            s = iso_boot.samples
            a2["band_C"] = C
            a2["band_N"] = percentile_interval(s["N_coef"][None, :] * C[:, None] ** s["a"][None, :],
                                               iso_boot.ci, axis=1)
            a2["band_D"] = percentile_interval(s["D_coef"][None, :] * C[:, None] ** s["b"][None, :],
                                               iso_boot.ci, axis=1)
        out["approach2"] = a2
    if chinchilla is not None:
        if flops_per_token is None:
            N3, D3 = chinchilla.N_opt(C), chinchilla.D_opt(C)
            a, bb = chinchilla.a, chinchilla.b
        else:
            N3, D3 = chinchilla.compute_optimal(C, flops_per_token)
            a, bb = (float(np.polyfit(np.log(C), np.log(v), 1)[0]) for v in (N3, D3))
        a3 = {"N": N3, "D": D3, "a": a, "b": bb, "label": f"Approach 3 ({label})"}
        if chinchilla_boot is not None:
            Cb = C if flops_per_token is None else np.geomspace(C[0], C[-1], BAND_POINTS)
            Nb, Db = allocation_samples(chinchilla_boot.samples, Cb, flops_per_token)
            a3["band_C"] = Cb
            a3["band_N"] = percentile_interval(Nb, chinchilla_boot.ci, axis=1)
            a3["band_D"] = percentile_interval(Db, chinchilla_boot.ci, axis=1)
            a3["ci"] = chinchilla_boot.ci
        out["approach3"] = a3
    return out


def frontier(path: str | os.PathLike, *, iso=None, iso_boot=None, chinchilla=None,
             chinchilla_boot=None, budgets: Sequence[float] | None = None, flops_per_token=None,
             flops_label: str | None = None, title: str = "Compute-optimal frontier") -> str:
    """Two panels, N_opt(C) and D_opt(C) against training FLOPs C (log-log): Approach 2's per-budget
    minima and fitted power laws (``iso``, bands from ``iso_boot``) and Approach 3's allocation
    (``chinchilla``, bands from ``chinchilla_boot``), all in one FLOP convention: that of
    ``flops_per_token`` (pass the runs' own, :func:`jscale.laws.report.runs_flops_per_token`, when
    ``iso`` comes from an IsoFLOP sweep — its budgets are ``flops_per_token(N)·D``), or ``C = 6ND``
    when None. The axis and legend name the convention (``flops_label``). ``budgets`` sets the C
    range (default: the data's budgets extended 10× on each side). See :func:`frontier_data`."""
    data = frontier_data(iso=iso, iso_boot=iso_boot, chinchilla=chinchilla,
                         chinchilla_boot=chinchilla_boot, budgets=budgets,
                         flops_per_token=flops_per_token, flops_label=flops_label)
    C, label = data["C"], data["convention"]
    fig, axes = _new(2)
    for ax, what in zip(axes, ("N", "D"), strict=True):
        a2 = data.get("approach2")
        if a2 is not None:
            pts = a2["N_min"] if what == "N" else a2["D_min"]
            ax.scatter(a2["budgets"], pts, color="C0", zorder=3,
                       label="Approach 2: IsoFLOP minima")
            expo = a2["a"] if what == "N" else a2["b"]
            ax.plot(C, a2[what], color="C0", label=f"Approach 2: $\\propto C^{{{expo:.3f}}}$")
            if "band_C" in a2:
                band = a2["band_" + what]
                ax.fill_between(a2["band_C"], band[:, 0], band[:, 1], color="C0", alpha=0.2,
                                label=f"Approach 2: {iso_boot.ci:.0%} bootstrap")
        a3 = data.get("approach3")
        if a3 is not None:
            expo = a3["a"] if what == "N" else a3["b"]
            approx = "\\propto" if flops_per_token is None else "\\approx"
            ax.plot(C, a3[what], color="C3", ls="--",
                    label=f"{a3['label']}: ${approx} C^{{{expo:.3f}}}$")
            if "band_C" in a3:
                band = a3["band_" + what]
                ax.fill_between(a3["band_C"], band[:, 0], band[:, 1], color="C3", alpha=0.15,
                                label=f"Approach 3: {a3['ci']:.0%} bootstrap")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"training compute C (FLOPs; {label})")
        ax.set_ylabel("compute-optimal parameters $N_{opt}$" if what == "N"
                      else "compute-optimal tokens $D_{opt}$")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    return _save(fig, path)


def fit_vs_observed(result, path: str | os.PathLike, *, color_by: str | None = None,
                    title: str | None = None) -> str:
    """Predicted vs observed loss for a fitted law (``FitResult``), colored by one of its inputs
    (default the first), with the y = x line and R², RMSE in the title."""
    key = color_by or result.law.inputs[0]
    if key not in result.inputs:
        raise ValueError(f"color_by: {key!r} is not an input of law {result.law.name!r} "
                         f"(inputs: {list(result.law.inputs)})")
    obs = result.loss
    pred = result.predict(**result.inputs)
    fig, (ax,) = _new(width=5.6, height=5.0)
    c = result.inputs[key]
    positive = bool(np.all(c > 0))
    sc = ax.scatter(obs, pred, c=c, cmap=_CMAP, s=18, zorder=3,
                    norm=LogNorm() if positive and c.max() / c.min() > 10 else None)
    lo, hi = min(obs.min(), pred.min()), max(obs.max(), pred.max())
    pad = 0.03 * (hi - lo)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=1, ls="--", label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("observed loss (nats/token)")
    ax.set_ylabel("fitted loss (nats/token)")
    fig.colorbar(sc, ax=ax, label=_INPUT_LABELS.get(key, key))
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or f"{result.law.name}: R² = {result.r2:.4f}, RMSE = {result.rmse:.4f}")
    return _save(fig, path)


def parscale_curves(result, path: str | os.PathLike, *,
                    title: str = "ParScale: loss vs parameters per number of streams P") -> str:
    """Observed loss vs non-embedding parameters N for each number of streams P (dots) and the
    fitted ParScale law (lines)."""
    if set(result.law.inputs) != {"N", "P"}:
        raise ValueError(f"result: expected a ParScale fit with inputs N and P "
                         f"(got {list(result.law.inputs)})")
    N, P, loss = result.inputs["N"], result.inputs["P"], result.loss
    Ps = np.unique(P)
    import matplotlib
    cmap = matplotlib.colormaps["plasma"]
    fig, (ax,) = _new()
    grid = np.geomspace(N.min() / 1.2, N.max() * 1.2, 200)
    for i, p in enumerate(Ps):
        c = cmap(0.1 + 0.75 * i / max(len(Ps) - 1, 1))
        sel = P == p
        ax.scatter(N[sel], loss[sel], color=c, s=22, zorder=3, label=f"P = {p:g}")
        ax.plot(grid, result.predict(grid, np.full_like(grid, p)), color=c, lw=1.3)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final loss (nats/token)")
    pr = result.params
    ax.set_title(title + "\n" + f"L = (A/(N(k ln P + 1)))^α + E:  E={pr['E']:.3f}, "
                 f"A={pr['A']:.3g}, α={pr['alpha']:.3f}, k={pr['k']:.3f}", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)
