"""IsoFLOP study on the bundled corpus: jscale's main job.

    python experiments/isoflop.py --preset cpu --out results/isoflop          # ~10 min on 2 CPU cores
    python experiments/isoflop.py --preset gpu --out results/iso --set data.path=corpus.jsonl \
        --set data.tokenizer=bpe --set model.vocab_size=32768                 # your own corpus

For each compute budget C, models of several sizes are trained for exactly the number of steps that
spends C (``jscale.sweep.isoflop``); every size is one group, its budgets are members of the group (so a
size compiles once). ``analyze`` then fits Chinchilla's Approach 2 (a parabola in log N per budget,
power laws through the minima) and Approach 3 (``L = E + A/N^α + B/D^β`` by robust Huber fitting),
plots the IsoFLOP curves, the compute-optimal frontier and fitted-vs-observed loss, and prints a
summary: the fitted laws with bootstrap intervals, the exponents a and b of ``N_opt ∝ C^a`` and
``D_opt ∝ C^b``, the compute-optimal N and D for the next budget up, and how well a fit without the
largest budget predicts it. The sweep resumes if interrupted: rerun the same command.

Conventions, stated in every answer: the loss is the final eval loss (nats per byte-level token, on
the eval set of ``train.eval_batches``); N = non-embedding parameters **plus the LM head** (V×D,
tied or not — the parameters whose FLOPs C counts; Porian et al. 2024), with the Kaplan convention
(non-embedding only) reported beside it; D = training tokens (every run is far below one epoch);
C = jscale's ``flops_per_token(...)["training"] × D`` (matmul FLOPs incl. attention and the head,
≈ 6.3–7.3·N·D here), and allocations are answered in that convention, with C = 6ND labelled where
shown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import jscale
import jscale.cli
from jscale import sweep

#: One architecture rule for every size of every preset: the dense transformer with multi-head
#: attention (n_kv_heads = n_heads: no size mixes MHA and GQA), head dim ``head_dim``, SwiGLU width
#: 3·D, at least two layers (a one-layer model cannot form induction heads and falls off the trend),
#: depth and width by :func:`jscale.sweep.shape_for_params` (aspect ratio D/L near ``aspect_ratio``).
#: Sizes are counted as N = non-embedding parameters + the V×D output head (``with_head``: the N whose
#: FLOPs C counts, Porian et al. 2024), spaced log-uniformly over ``span`` around
#: N* = sqrt(C / (6 · tokens_per_param)) at every budget, so the valley moves with the budget.
#: Learning rate per size: ``lr = lr_ref · (N / n_ref)^(−lr_exponent)`` (fitted on the cpu range,
#: see ``LR_PILOT``); warmup: N tokens (Porian et al. 2024), at most a tenth of the run. Every run
#: has seed 0 — the same initialisation draw and data order at every size, so the sizes of a budget
#: differ by their shape, not their luck. The final loss is the eval loss on ``eval_batches ×
#: batch_size × seq_len`` validation tokens spread over the whole validation split.
PRESETS = {
    # ~10 minutes on 2 CPU cores: 3 budgets × 5 sizes, N ≈ 11 k – 340 k, D ≤ ~3.6 M tokens (< 0.5
    # epochs of the bundled corpus).
    "cpu": dict(seq_len=64, batch_size=16, head_dim=8, aspect_ratio=24.0,
                budgets=[1e11, 3e11, 1e12], n_sizes=5, span=8.0, tokens_per_param=15.0,
                lr_ref=1.15e-2, n_ref=7e4, lr_exponent=0.31, eval_batches=64),
    # One GPU, a few hours: 4 budgets × 7 sizes, N ≈ 3 M – 100 M; needs a corpus of ≥ ~10 B tokens.
    "gpu": dict(seq_len=512, batch_size=64, head_dim=64, aspect_ratio=64.0,
                budgets=[1e17, 3e17, 1e18, 3e18], n_sizes=7, span=16.0, tokens_per_param=20.0,
                lr_ref=8.5e-3, n_ref=7e4, lr_exponent=0.5, eval_batches=64, corpus=True),
    # A TPU pod slice: 4 budgets × 9 sizes, N ≈ 50 M – 2 B; needs a corpus of ≥ ~1 T tokens.
    "tpu": dict(seq_len=1024, batch_size=256, head_dim=128, aspect_ratio=128.0,
                budgets=[1e19, 1e20, 1e21, 1e22], n_sizes=9, span=16.0, tokens_per_param=20.0,
                lr_ref=8.5e-3, n_ref=7e4, lr_exponent=0.5, eval_batches=64, corpus=True),
}


def lr_for(n_params: float, p: dict) -> float:
    """The preset's learning-rate rule at N = ``n_params`` (non-embedding + head)."""
    return p["lr_ref"] * (n_params / p["n_ref"]) ** -p["lr_exponent"]


def base_config(preset: str, overrides: dict | None = None) -> jscale.RunConfig:
    """The preset's base run (architecture, batch, schedule, eval set) with ``overrides`` applied;
    the ``gpu``/``tpu`` presets refuse to run without a user corpus (``data.path``)."""
    if preset not in PRESETS:
        raise jscale.ConfigError(f"--preset: must be one of {sorted(PRESETS)} (got {preset!r})")
    p, overrides = PRESETS[preset], dict(overrides or {})
    if p.get("corpus") and not overrides.get("data.path"):
        raise jscale.ConfigError(
            f"data.path: the {preset} preset trains on far more tokens than the bundled 9.7 M-token "
            "corpus holds (it would repeat it thousands of times); give it your own corpus and "
            "tokenizer, e.g. --set data.path=/data/corpus.jsonl --set data.tokenizer=bpe "
            "--set model.vocab_size=32768")
    heads = max(1, 64 // p["head_dim"])
    return jscale.presets.get("tiny").override({
        "model.d_model": heads * p["head_dim"], "model.n_heads": heads, "model.n_kv_heads": heads,
        "model.d_ff": 3 * heads * p["head_dim"], "model.max_seq_len": max(512, p["seq_len"]),
        "train.seq_len": p["seq_len"], "train.batch_size": p["batch_size"],
        "optim.schedule": "cosine", "train.log_every": 50, "train.eval_every": 0,
        "train.eval_batches": p["eval_batches"], "train.checkpoint_every": 0, "train.seed": 0,
        **overrides})


def sized_runs(preset: str, budgets, overrides: dict | None = None, **isoflop_kwargs) -> list:
    """Runs of ``preset``'s architecture rule at ``budgets`` (sizes by ``jscale.sweep.isoflop``,
    which takes ``isoflop_kwargs``), each with the preset's lr rule and warmup."""
    p = PRESETS[preset]
    kwargs = dict(n_sizes=p["n_sizes"], span=p["span"], tokens_per_param=p["tokens_per_param"])
    runs = sweep.isoflop(base_config(preset, overrides), budgets,
                         **{**kwargs, **isoflop_kwargs}, count="with_head", head_dim=p["head_dim"],
                         aspect_ratio=p["aspect_ratio"], count_rtol=0.4, min_layers=2)
    tokens_per_step = p["batch_size"] * p["seq_len"]
    out = []
    for r in runs:
        if isinstance(r, sweep.InvalidRun):
            out.append(r)
            continue
        n = jscale.count_params(r.model)["with_head"]
        warmup = max(1, min(round(n / tokens_per_step), r.train.steps // 10))
        out.append(r.override({"optim.lr": lr_for(n, p), "optim.warmup_steps": warmup}))
    return out


def grid(preset: str, overrides: dict | None = None) -> list:
    """IsoFLOP grid: budgets × model sizes, steps chosen to spend each budget (presets: cpu, gpu,
    tpu). ``overrides`` (``--set KEY=VALUE``) apply to the base config before sizing."""
    return sized_runs(preset, PRESETS[preset]["budgets"] if preset in PRESETS else [], overrides)


def analyze(df, out_dir: Path) -> None:
    """Approaches 2 and 3, plots, and the summary table (see the module docstring)."""
    from jscale import laws
    from jscale.laws import report

    out_dir = Path(out_dir)
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        print(line)

    n_boot = 200
    echo("== Approach 2: parabolas through each IsoFLOP curve, power laws through the minima ==")
    try:
        rep2 = report.analyze(df, out_dir / "approach2", law="isoflop", bootstrap=n_boot,
                              n_params="with_head", echo=echo)
    except (report.FitInputError, ValueError) as e:
        rep2 = None
        echo(f"Approach 2 not possible on these runs: {e}")
    echo("== Approach 3: L(N, D) = E + A/N^alpha + B/D^beta, Huber on log loss, 4,500 starts ==")
    # the Approach 2 fit above is drawn beside Approach 3 (not fitted again); the Approach 3 fit and
    # its bootstrap below are the report's own (fitted once)
    rep3 = report.analyze(df, out_dir / "approach3", law="chinchilla", bootstrap=n_boot,
                          n_params="with_head", echo=echo,
                          approach2=rep2.fit if rep2 is not None else None)
    summary = {"approach2": rep2.summary if rep2 is not None else None, "approach3": rep3.summary}

    runs = rep3.runs                                    # usable_runs(df, n_params="with_head")
    budgets = np.sort(runs["budget"].dropna().unique())
    if len(budgets) >= 3:
        cut = float(budgets[-1])
        ex = laws.extrapolation_check({"N": runs["N"], "D": runs["D"]}, runs["loss"],
                                      runs["budget"], cut)
        summary["extrapolation"] = ex.to_dict()
        echo(f"== Extrapolation: Approach 3 fitted on budgets < {cut:.3g} FLOPs predicts the "
             f"{int(np.sum(ex.held_out))} runs at {cut:.3g}: mean |error| "
             f"{100 * ex.mean_abs_rel_error:.2f} %, max {100 * ex.max_abs_rel_error:.2f} %")
    if len(budgets):
        fitted = rep3.fit
        fpt = report.runs_flops_per_token(runs)
        next_c = float(budgets[-1]) * (budgets[-1] / budgets[-2] if len(budgets) > 1 else 10.0)
        n_opt, d_opt = (float(np.ravel(v)[0]) for v in fitted.compute_optimal(next_c, fpt))
        n_iv, d_iv = rep3.bootstrap.allocation_intervals([next_c], fpt)   # its samples, no refit
        (n_lo, n_hi), (d_lo, d_hi) = n_iv[0], d_iv[0]
        echo(f"== Next budget up, C = {next_c:.3g} training FLOPs in jscale's convention "
             f"(C = flops_per_token(N)·D): N_opt = {n_opt:,.0f} [{n_lo:,.0f}, {n_hi:,.0f}] "
             f"parameters (non-embedding + head), D_opt = {d_opt:,.0f} [{d_lo:,.0f}, {d_hi:,.0f}] "
             f"tokens (95 % bootstrap); exponents a = {fitted.a:.3f}, b = {fitted.b:.3f}")
        echo(f"   (under C = 6ND instead: N_opt = {float(fitted.N_opt(next_c)):,.0f}, "
             f"D_opt = {float(fitted.D_opt(next_c)):,.0f} — the closed form, labelled; jscale's "
             f"FLOPs per token are {fpt(np.array([n_opt]))[0] / n_opt:.2f}·N at N_opt)")
        summary["next_budget"] = {
            "C": next_c, "flops_convention": "C = flops_per_token(N)·D (jscale.flops_per_token)",
            "N_convention": "non-embedding + LM head", "N_opt": n_opt, "D_opt": d_opt,
            "N_opt_interval": [n_lo, n_hi], "D_opt_interval": [d_lo, d_hi],
            "six_nd": {"N_opt": float(fitted.N_opt(next_c)), "D_opt": float(fitted.D_opt(next_c))},
            "a": fitted.a, "b": fitted.b}
        kaplan = report.usable_runs(df, n_params="non_embedding")
        k3 = laws.fit_chinchilla(kaplan["N"], kaplan["D"], kaplan["loss"])
        echo(f"== The same Approach 3 with N = non-embedding parameters (Kaplan's convention): "
             f"E = {k3.E:.3f}, A = {k3.A:.4g}, B = {k3.B:.4g}, alpha = {k3.alpha:.3f}, "
             f"beta = {k3.beta:.3f}, a = {k3.a:.3f}, b = {k3.b:.3f} (R² {k3.r2:.4f}); counting "
             f"the head (above) is the convention consistent with C")
        summary["approach3_non_embedding"] = k3.to_dict()
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"summary: {out_dir / 'summary.txt'}", file=sys.stderr)


if __name__ == "__main__":
    jscale.cli.experiment(grid, analyze)
