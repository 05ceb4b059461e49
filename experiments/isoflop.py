"""IsoFLOP study on the bundled corpus: jscale's main job.

    python experiments/isoflop.py --preset cpu --out results/isoflop
    jscale sweep experiments/isoflop.py --preset cpu --out results/isoflop

For each compute budget C, models of several sizes are trained for exactly the number of steps that
spends C (``jscale.sweep.isoflop``); every size is one group, its budgets are members of the group (so a
size compiles once). ``analyze`` then fits Chinchilla's Approach 2 (a parabola in log N per budget,
power laws through the minima) and Approach 3 (``L = E + A/N^α + B/D^β`` by robust Huber fitting),
plots the IsoFLOP curves, the compute-optimal frontier and fitted-vs-observed loss, and prints a
summary: the fitted law, the exponents a and b of ``N_opt ∝ C^a`` and ``D_opt ∝ C^b``, the
compute-optimal N and D for the next budget up, and how well a fit without the largest budget
predicts it. The sweep resumes if interrupted: rerun the same command.

N is the non-embedding parameter count (Kaplan et al.; at these sizes the embedding is a large share
of all parameters), D the training tokens, C = jscale's ``flops_per_token(...)["training"] × D``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import jscale
from jscale import sweep

PRESETS = {
    # ~7 minutes on 2 CPU cores: 3 budgets × 5 sizes of ~13 k – 220 k non-embedding parameters.
    "cpu": dict(model="tiny", seq_len=64, batch_size=16, lr=3e-3, warmup=20,
                budgets=[1e11, 3e11, 1e12], n_params=[1.5e4, 3e4, 6e4, 1.2e5, 2.4e5]),
    # One GPU, a few hours: 4 budgets × 7 sizes of ~1 M – 64 M parameters.
    "gpu": dict(model="small", seq_len=512, batch_size=64, lr=1e-3, warmup=200,
                budgets=[1e15, 3e15, 1e16, 3e16],
                n_params=[1e6 * 2 ** i for i in range(7)]),
    # A TPU pod slice: 4 budgets × 9 sizes of ~10 M – 2.5 B parameters.
    "tpu": dict(model="small", seq_len=1024, batch_size=256, lr=5e-4, warmup=500,
                budgets=[1e17, 1e18, 1e19, 1e20],
                n_params=[1e7 * 2 ** i for i in range(9)]),
}


def grid(preset: str) -> list:
    """IsoFLOP grid: budgets × model sizes, steps chosen to spend each budget (presets: cpu, gpu, tpu)."""
    if preset not in PRESETS:
        raise jscale.ConfigError(f"--preset: must be one of {sorted(PRESETS)} (got {preset!r})")
    p = PRESETS[preset]
    base = jscale.presets.get(p["model"]).override({
        "train.seq_len": p["seq_len"], "train.batch_size": p["batch_size"], "optim.lr": p["lr"],
        "optim.warmup_steps": p["warmup"], "optim.schedule": "cosine",
        "train.log_every": 50, "train.eval_every": 0, "train.eval_batches": 8})
    runs = sweep.isoflop(base, p["budgets"], n_params=p["n_params"])
    # Warm up for at most a tenth of a run (the largest models get few steps at the smallest budget).
    return [r.override({"optim.warmup_steps": min(p["warmup"], max(1, r.train.steps // 10))})
            for r in runs]


def analyze(df, out_dir: Path) -> None:
    """Approaches 2 and 3, plots, and the summary table (see the module docstring)."""
    from jscale import laws
    from jscale.laws import report

    out_dir = Path(out_dir)
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        print(line)

    echo("== Approach 2: parabolas through each IsoFLOP curve, power laws through the minima ==")
    try:
        iso = report.analyze(df, out_dir / "approach2", law="isoflop", bootstrap=200, echo=echo)
    except (report.FitInputError, ValueError) as e:
        iso = None
        echo(f"Approach 2 not possible on these runs: {e}")
    echo("== Approach 3: L(N, D) = E + A/N^alpha + B/D^beta, Huber on log loss, 4,500 starts ==")
    fit3 = report.analyze(df, out_dir / "approach3", law="chinchilla", bootstrap=200, echo=echo)

    runs = report.usable_runs(df)
    budgets = np.sort(runs["budget"].dropna().unique())
    summary = {"approach2": iso, "approach3": fit3}
    if len(budgets) >= 3:
        cut = float(budgets[-1])
        ex = laws.extrapolation_check({"N": runs["N"], "D": runs["D"]}, runs["loss"],
                                      runs["budget"], cut)
        summary["extrapolation"] = ex.to_dict()
        echo(f"== Extrapolation: fitted on budgets < {cut:.3g} FLOPs, predicting the {cut:.3g} runs: "
             f"mean |error| {100 * ex.mean_abs_rel_error:.2f} %, max {100 * ex.max_abs_rel_error:.2f} %")
    if len(budgets):
        fitted = laws.fit_chinchilla(runs["N"], runs["D"], runs["loss"])
        next_c = float(budgets[-1]) * (budgets[-1] / budgets[-2] if len(budgets) > 1 else 10.0)
        echo(f"== Next budget up, C = {next_c:.3g} FLOPs (C = 6ND): "
             f"N_opt = {float(fitted.N_opt(next_c)):,.0f} non-embedding params, "
             f"D_opt = {float(fitted.D_opt(next_c)):,.0f} tokens; "
             f"exponents a = {fitted.a:.3f}, b = {fitted.b:.3f}")
        summary["next_budget"] = {"C": next_c, "N_opt": float(fitted.N_opt(next_c)),
                                  "D_opt": float(fitted.D_opt(next_c)), "a": fitted.a, "b": fitted.b}
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"summary: {out_dir / 'summary.txt'}", file=sys.stderr)


if __name__ == "__main__":
    sweep.main(grid, analyze)
