"""MoE Efficiency Leverage: how much less compute a mixture-of-experts model needs for a dense model's loss.

    python experiments/moe_leverage.py --preset cpu --out results/moe_leverage  # ~12 min, 2 CPU cores
    python experiments/moe_leverage.py --preset gpu --out results/moe --set data.path=corpus.jsonl \
        --set data.tokenizer=bpe --set model.vocab_size=32768                    # one GPU, your corpus

After "Towards Greater Leverage: Scaling Laws for Efficient MoE Language Models" (arXiv 2507.17702).
Configurations: the dense transformer and MoE transformers (every FFN routed, no shared expert) over
activation ratios ``A = top_k / E`` and granularities ``G = 2·d_model / d_expert``. For every
configuration and compute budget C, models of several sizes train for exactly the steps that spend C
(IsoFLOP-style: sizes spaced log-uniformly over ``span`` around ``N* = sqrt(C / (6 · tokens_per_param))``
in **active** parameters). ``analyze`` takes each configuration's compute–loss frontier (the lowest
final eval loss at each budget), fits ``L(C) = A_L · (C / C_ref)^(−α)`` to it, and reports the
Efficiency Leverage of each MoE configuration ``EL = C_dense(L) / C_MoE(L)`` at equal loss.

Conventions, printed with every answer:

* loss: the final eval loss (``final_eval_loss``, nats per token on the ``train.eval_batches`` eval set);
* N: **active** parameters, non-embedding + the LM head (``n_params_with_head`` less the routed experts
  a token is not sent to: ``count_params(cfg)["with_head"] − (total − active)``); for the dense model
  it is ``with_head``, as in experiments/isoflop.py;
* C: each run's own training FLOPs ``flops_per_token(cfg)["training"] × tokens`` (jscale's matmul
  FLOPs; for MoE the router and the ``top_k`` active experts only — not the E× work that
  ``ragged_dot`` does on CPU);
* the frontier: per configuration and budget, the run with the lowest final eval loss (its own C);
* the fit: ``ln L = a − α·ln(C / C_ref)`` by ``jscale.laws.fit`` (Huber on log loss), ``C_ref`` the
  geometric mean of the budgets; no irreducible term (2–3 frontier points cannot identify one);
* EL: at the reference loss ``L_ref = L_MoE(C_max)`` (the MoE fit at the largest budget),
  ``EL = C_dense(L_ref) / C_max`` with ``C_dense`` the inverted dense fit; beside it, the geometric
  mean over the MoE frontier points of ``C_dense(L_i) / C_i`` (the dense fit inverted at each
  observed MoE frontier loss);
* intervals: 95 % percentile bootstrap; each resample draws, independently for every configuration and
  within every budget, that budget's runs with replacement, recomputes the frontier and refits (the
  budgets themselves are never dropped); EL is recomputed from the resampled dense and MoE fits.

Learning rate: experiments/isoflop.py's rule ``lr = lr_ref · (N / n_ref)^(−lr_exponent)`` at N = the
active count above, for dense and MoE alike (the rule was fitted on dense models; a per-configuration
rule is future work). Seed 0 everywhere. Router: softmax-top-k, load-balance 0.01, z-loss 1e-3,
aux-loss-free bias balancing 1e-3 (as the ``moe-tiny`` preset).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

import jscale
import jscale.cli
from jscale import sweep
from jscale.models import sizing
from jscale.models.moe import MoEConfig

#: ``(n_experts, top_k, granularity)`` of every MoE configuration; the dense model is always added.
#: ``cpu``: activation ratios 1/4 and 1/8 at G = 1, and G = 2 at ratio 1/4 (the same total and
#: active expert parameters as (4, 1, 1), split into twice as many experts of half the width).
PRESETS = {
    # ~12 minutes on 2 CPU cores (estimated, not run whole, from three timed runs on cores shared
    # with other jobs: 11 s for a 1e10 dense run, 24 s for a 1e11 dense, 28 s for a 1e11 E=8 one):
    # 4 configurations × 3 budgets × 3 sizes = 36 runs, 9,457 steps, N_active ≈ 3.8 k – 72 k,
    # D ≤ 0.7 M tokens. The MoE runs cost E× their active FFN FLOPs on CPU (ragged_dot computes
    # every expert on every row), hence budgets 10× below isoflop.py's cpu.
    "cpu": dict(seq_len=64, batch_size=16, head_dim=8, aspect_ratio=24.0,
                budgets=[1e10, 3e10, 1e11], n_sizes=3, span=4.0, tokens_per_param=15.0,
                lr_ref=1.15e-2, n_ref=7e4, lr_exponent=0.31, eval_batches=64,
                moe=[(4, 1, 1), (8, 1, 1), (8, 2, 2)]),
    # One GPU, ~5–10 hours (6.2e18 model FLOPs in all, untimed): 9 configurations (dense; E ∈ {4, 8}
    # × top_k ∈ {1, 2} × G ∈ {1, 2}) × 3 budgets × ≤ 5 sizes = 129 runs (sizes off the budget by more
    # than 5 % are dropped), N_active ≈ 2.3 M – 87 M, D ≤ 1.5 B tokens: needs a corpus of ≥ ~2 B tokens.
    "gpu": dict(seq_len=512, batch_size=64, head_dim=64, aspect_ratio=64.0,
                budgets=[1e16, 3e16, 1e17], n_sizes=5, span=8.0, tokens_per_param=20.0,
                lr_ref=8.5e-3, n_ref=7e4, lr_exponent=0.5, eval_batches=64, corpus=True,
                moe=[(e, k, g) for e in (4, 8) for k in (1, 2) for g in (1, 2)]),
}

#: Bootstrap resamples of every configuration's frontier fit.
N_BOOT = 200
#: The level of every reported interval.
CI = 0.95

CONVENTIONS = (
    "conventions: loss = final eval loss (nats/token); N = ACTIVE parameters, non-embedding + LM head; "
    "C = each run's flops_per_token(cfg)['training'] x tokens (MoE: router + top_k active experts "
    "only); frontier = lowest final eval loss per budget; fit ln L = a - alpha ln(C/C_ref) (Huber, "
    "jscale.laws.fit); EL = C_dense(L_ref)/C_MoE at L_ref = L_MoE(C_max); 95 % bootstrap over runs "
    "within each budget, per configuration")


def lr_for(n_params: float, p: dict) -> float:
    """The preset's learning-rate rule (experiments/isoflop.py's) at N = ``n_params`` (active)."""
    return p["lr_ref"] * (n_params / p["n_ref"]) ** -p["lr_exponent"]


def active_with_head(model) -> int:
    """Active parameters, non-embedding + LM head: ``with_head`` less the unused routed experts."""
    c = jscale.count_params(model)
    return int(c["with_head"] - (c["total"] - c["active"]))


class _ActiveCount:
    """The model's family with ``count_params(cfg)["with_head"]`` replaced by the active count, so
    that :func:`jscale.models.sizing.shape_for_params` sizes by active parameters (same shape rule)."""

    def __init__(self, family):
        self.family = family

    def shape_step(self, *args, **kwargs):
        return self.family.shape_step(*args, **kwargs)

    def count_params(self, cfg):
        return {"with_head": active_with_head(cfg)}


def base_config(preset: str, overrides: dict | None = None, moe: tuple | None = None
                ) -> jscale.RunConfig:
    """The preset's dense base run (``moe=None``) or its MoE base ``(E, top_k, G)``, with
    ``overrides``; the ``gpu`` preset refuses to run without a user corpus (``data.path``)."""
    if preset not in PRESETS:
        raise jscale.ConfigError(f"--preset: must be one of {sorted(PRESETS)} (got {preset!r})")
    p, overrides = PRESETS[preset], dict(overrides or {})
    if p.get("corpus") and not overrides.get("data.path"):
        raise jscale.ConfigError(
            f"data.path: the {preset} preset trains on far more tokens than the bundled corpus holds; "
            "give it your own corpus and tokenizer, e.g. --set data.path=/data/corpus.jsonl "
            "--set data.tokenizer=bpe --set model.vocab_size=32768")
    heads = max(1, 64 // p["head_dim"])
    d = heads * p["head_dim"]
    base = jscale.presets.get("tiny").override({
        "model.d_model": d, "model.n_heads": heads, "model.n_kv_heads": heads,
        "model.d_ff": 3 * d, "model.max_seq_len": max(512, p["seq_len"]),
        "train.seq_len": p["seq_len"], "train.batch_size": p["batch_size"],
        "optim.schedule": "cosine", "train.log_every": 50, "train.eval_every": 0,
        "train.eval_batches": p["eval_batches"], "train.checkpoint_every": 0, "train.seed": 0,
        **overrides})
    if moe is None:
        return base
    e, k, g = moe
    cfg = MoEConfig(n_experts=e, top_k=k, d_expert=int(round(2 * d / g)), n_shared_experts=0,
                    load_balance_coeff=0.01, z_loss_coeff=1e-3, bias_update_rate=1e-3)
    return dataclasses.replace(base, model=dataclasses.replace(base.model, moe=cfg))


def _model_overrides(model) -> dict:
    out = {}
    for k, v in dataclasses.asdict(model).items():
        if k == "moe":
            out.update({f"model.moe.{kk}": vv for kk, vv in (v or {}).items()})
        else:
            out[f"model.{k}"] = v
    return out


def sized_runs(preset: str, budgets, overrides: dict | None = None, moe: tuple | None = None) -> list:
    """One configuration's runs at ``budgets``: ``n_sizes`` active counts over ``span`` around N*,
    shaped by the family's rule (sized by active parameters), steps spending each budget."""
    p = PRESETS[preset]
    base = base_config(preset, overrides, moe)
    family = _ActiveCount(jscale.models.family_of(base.model))
    tokens_per_step = p["batch_size"] * p["seq_len"]
    out = []
    for budget in budgets:
        n_star = math.sqrt(budget / (6 * p["tokens_per_param"]))
        sizes, seen = [], set()
        for i in range(p["n_sizes"]):
            target = n_star * p["span"] ** (i / max(1, p["n_sizes"] - 1) - 0.5)
            shape = sizing.shape_for_params(family, target, base.model, count="with_head",
                                            head_dim=p["head_dim"], aspect_ratio=p["aspect_ratio"],
                                            count_rtol=0.4, min_layers=2)
            key = (shape.n_layers, shape.d_model)
            if key not in seen:
                seen.add(key)
                sizes.append(_model_overrides(shape))
        for r in sweep.isoflop(base, [budget], sizes=sizes):
            if isinstance(r, sweep.InvalidRun):
                out.append(r)
                continue
            n = active_with_head(r.model)
            warmup = max(1, min(round(n / tokens_per_step), r.train.steps // 10))
            out.append(r.override({"optim.lr": lr_for(n, p), "optim.warmup_steps": warmup}))
    return out


def grid(preset: str, overrides: dict | None = None) -> list:
    """Dense and MoE runs at every budget of the preset (cpu, gpu), sized by active parameters.

    ``overrides`` (``--set KEY=VALUE``) apply to every base config before sizing; ``model.moe.*``
    is refused (the CLI reapplies every override to every run: the dense runs would become MoE)."""
    if preset not in PRESETS:
        raise jscale.ConfigError(f"--preset: must be one of {sorted(PRESETS)} (got {preset!r})")
    moe_keys = sorted(k for k in (overrides or {}) if k == "model.moe" or k.startswith("model.moe."))
    if moe_keys:
        raise jscale.ConfigError(
            f"{moe_keys[0]}: the experiment CLI applies every --set to every run, the dense ones "
            "included (it would make them MoE); change MoE fields in this script (base_config, "
            "PRESETS[...]['moe']) instead")
    p = PRESETS[preset]
    runs = sized_runs(preset, p["budgets"], overrides)
    for moe in p["moe"]:
        runs += sized_runs(preset, p["budgets"], overrides, moe)
    return runs


# --- analysis --------------------------------------------------------------------------------------

def _frontier_law():
    import jax.numpy as jnp

    from jscale import laws

    def lse(x):
        logx = np.log(np.asarray(x["x"], float))
        G = np.zeros((1, logx.shape[0], 2))
        G[0, :, 0], G[0, :, 1] = 1.0, -logx
        return G, np.zeros((1, logx.shape[0]))

    return laws.Law(
        name="compute_power_law", inputs=("x",), params=("a", "alpha"),
        log_predict=lambda t, x: t["a"] - t["alpha"] * jnp.log(x["x"]),
        public=lambda t: {"A": jnp.exp(t["a"]), "alpha": t["alpha"]},
        grid={"a": [0.0, 1.0, 2.0, 3.0], "alpha": [0.0, 0.05, 0.1, 0.2, 0.4]}, lse=lse,
        formula="L = A * (C/C_ref)^-alpha")


def _label(row) -> tuple:
    """``("dense",)`` or ``(E, top_k, G)`` of a results row."""
    e = row.get("model.moe.n_experts")
    if e is None or (isinstance(e, float) and math.isnan(e)):
        return ("dense",)
    g = 2 * float(row["model.d_model"]) / float(row["model.moe.d_expert"])
    return (int(e), int(row["model.moe.top_k"]), round(g, 3))


def _name(label: tuple) -> str:
    if label == ("dense",):
        return "dense"
    e, k, g = label
    return f"MoE E={e} k={k} G={g:g} (A={k}/{e})"


def _frontier(runs, rng=None):
    """``(C, L)`` arrays of the lowest-loss run per budget (``rng``: resample runs per budget)."""
    C, L = [], []
    for _, g in runs.groupby("budget"):
        idx = np.arange(len(g)) if rng is None else rng.integers(0, len(g), len(g))
        sub = g.iloc[idx]
        best = sub.iloc[int(np.argmin(sub["loss"].to_numpy()))]
        C.append(float(best["C"]))
        L.append(float(best["loss"]))
    return np.array(C), np.array(L)


def _fit(law, C, L, c_ref):
    from jscale import laws
    r = laws.fit(law, {"x": C / c_ref}, L)
    return float(r.A), float(r.alpha), r


def _c_at(A, alpha, L, c_ref):
    """The compute at which ``A·(C/C_ref)^−α`` reaches loss ``L``."""
    return c_ref * (A / np.asarray(L, float)) ** (1.0 / alpha)


def usable(df):
    """The finished, non-diverged runs with a final eval loss: label, C, loss, active N."""
    import pandas as pd
    ok = df[(df.get("status") == "ok") & df["final_eval_loss"].notna()].copy()
    if "diverged" in ok:
        ok = ok[~ok["diverged"].fillna(False).astype(bool)]
    ok = ok[np.isfinite(ok["final_eval_loss"].astype(float)) & ok["budget"].notna()]
    labels = [_label(r) for r in ok.to_dict("records")]
    n_active = (ok["n_params_with_head"] - (ok["n_params"] - ok["n_params_active"])
                if {"n_params_with_head", "n_params_active"} <= set(ok) else ok["n_params"])
    return pd.DataFrame({"label": labels, "C": ok["flops"].astype(float).to_numpy(),
                         "budget": ok["budget"].astype(float).to_numpy(),
                         "loss": ok["final_eval_loss"].astype(float).to_numpy(),
                         "N_active": np.asarray(n_active, float)})


def analyze(df, out_dir: Path, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Frontiers, their power laws, EL with bootstrap intervals, plots and the summary (see the
    module docstring); returns the summary dict."""
    from jscale.laws import plots as lp

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        print(line)

    echo("== MoE Efficiency Leverage: compute-loss frontiers, power laws, EL = C_dense/C_MoE at "
         "equal loss ==")
    echo(CONVENTIONS)
    runs = usable(df)
    labels = sorted(set(runs["label"]), key=lambda t: (t != ("dense",), t))
    if ("dense",) not in labels:
        raise ValueError("moe_leverage: no finished dense runs: EL needs the dense frontier")
    budgets = np.sort(runs["budget"].unique())
    c_ref = float(np.exp(np.mean(np.log(budgets))))
    c_max = float(budgets[-1])
    law = _frontier_law()
    rng = np.random.default_rng(seed)
    fits, boots = {}, {}
    for lab in labels:
        sub = runs[runs["label"] == lab]
        if sub["budget"].nunique() < 2:
            echo(f"{_name(lab)}: fewer than 2 budgets with finished runs; no fit")
            continue
        C, L = _frontier(sub)
        A, alpha, res = _fit(law, C, L, c_ref)
        samples = []
        for _ in range(n_boot):
            Cb, Lb = _frontier(sub, rng)
            try:
                samples.append(_fit(law, Cb, Lb, c_ref)[:2])
            except RuntimeError:
                samples.append((np.nan, np.nan))
        fits[lab] = dict(A=A, alpha=alpha, C=C, L=L, r2=res.r2, rmse=res.rmse,
                         N_opt=[float(sub[sub["budget"] == b].sort_values("loss")["N_active"].iloc[0])
                                for b in np.sort(sub["budget"].unique())])
        boots[lab] = np.array(samples)

    dense = fits.get(("dense",))
    if dense is None:
        raise ValueError("moe_leverage: the dense runs span fewer than 2 budgets")
    q = 100 * np.array([(1 - CI) / 2, (1 + CI) / 2])
    summary: dict = {"conventions": CONVENTIONS, "C_ref": c_ref, "C_max": c_max,
                     "budgets": budgets.tolist(), "n_boot": n_boot, "ci": CI, "configs": []}
    echo(f"{'configuration':34s} {'act.ratio':>9s} {'G':>4s} {'A_L':>7s} {'alpha':>7s} "
         f"{'L(C_max)':>9s} {'EL':>6s} {'EL 95% interval':>17s} {'EL(points)':>10s}")
    if not dense["alpha"] > 0:
        echo(f"warning: the dense frontier does not fall with compute (alpha = {dense['alpha']:.4f}): "
             "EL is undefined (reported as nan)")
    dense_range = (float(dense["L"].min()), float(dense["L"].max()))
    for lab, f in fits.items():
        L_ref = float(f["A"] * (c_max / c_ref) ** -f["alpha"])
        entry = {"label": _name(lab), "dense": lab == ("dense",), "A": f["A"], "alpha": f["alpha"],
                 "r2": f["r2"], "rmse": f["rmse"], "frontier_C": f["C"].tolist(),
                 "frontier_loss": f["L"].tolist(), "frontier_N_active": f["N_opt"],
                 "L_at_C_max": L_ref,
                 "alpha_interval": np.nanpercentile(boots[lab][:, 1], q).tolist()}
        if lab != ("dense",):
            e, k, g = lab
            with np.errstate(all="ignore"):
                el = float(_c_at(dense["A"], dense["alpha"], L_ref, c_ref) / c_max)
                el_pts = float(np.exp(np.mean(np.log(
                    _c_at(dense["A"], dense["alpha"], f["L"], c_ref) / f["C"]))))
            if not dense["alpha"] > 0:
                el = el_pts = float("nan")
            bd, bm = boots[("dense",)], boots[lab]
            Lb = bm[:, 0] * (c_max / c_ref) ** -bm[:, 1]
            with np.errstate(all="ignore"):
                el_b = _c_at(bd[:, 0], bd[:, 1], Lb, c_ref) / c_max
            iv = np.nanpercentile(el_b, q).tolist()
            extrap = not dense_range[0] <= L_ref <= dense_range[1]
            entry.update(n_experts=e, top_k=k, granularity=g, activation_ratio=k / e, EL=el,
                         EL_interval=iv, EL_points=el_pts, dense_extrapolated=extrap)
            echo(f"{_name(lab):34s} {k / e:9.4f} {g:4g} {f['A']:7.4f} {f['alpha']:7.4f} "
                 f"{L_ref:9.4f} {el:6.3f} [{iv[0]:6.3f}, {iv[1]:6.3f}] {el_pts:10.3f}"
                 + ("  (dense fit extrapolated)" if extrap else ""))
        else:
            echo(f"{'dense':34s} {1.0:9.4f} {'-':>4s} {f['A']:7.4f} {f['alpha']:7.4f} "
                 f"{L_ref:9.4f} {1.0:6.3f} {'':17s} {'':>10s}")
        summary["configs"].append(entry)

    # plots
    fig, (ax,) = lp._new()
    cmap = __import__("matplotlib").colormaps["tab10"]
    grid_c = np.geomspace(budgets[0] / 1.5, budgets[-1] * 1.5, 50)
    for i, (lab, f) in enumerate(fits.items()):
        col = "black" if lab == ("dense",) else cmap(i % 10)
        sub = runs[runs["label"] == lab]
        ax.scatter(sub["C"], sub["loss"], s=10, color=col, alpha=0.3)
        ax.scatter(f["C"], f["L"], s=36, color=col, edgecolor="black", zorder=3)
        ax.plot(grid_c, f["A"] * (grid_c / c_ref) ** -f["alpha"], color=col,
                label=f"{_name(lab)}: α={f['alpha']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs C (active: flops_per_token × tokens)")
    ax.set_ylabel("final eval loss")
    ax.set_title("compute–loss frontiers (large markers) and L = A·(C/C_ref)^−α")
    ax.legend(fontsize=7)
    lp._save(fig, out_dir / "loss_vs_compute.png")

    fig, (ax,) = lp._new()
    moes = [c for c in summary["configs"] if not c["dense"]]
    for g in sorted({c["granularity"] for c in moes}):
        cs = sorted((c for c in moes if c["granularity"] == g), key=lambda c: c["activation_ratio"])
        x = np.array([c["activation_ratio"] for c in cs])
        y = np.array([c["EL"] for c in cs])
        lo = np.array([c["EL_interval"][0] for c in cs])
        hi = np.array([c["EL_interval"][1] for c in cs])
        err = np.nan_to_num(np.vstack([np.maximum(y - lo, 0), np.maximum(hi - y, 0)]))
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"G = {g:g}")
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="dense (EL = 1)")
    ax.set_xscale("log")
    ratios = sorted({(c["activation_ratio"], f"{c['top_k']}/{c['n_experts']}") for c in moes})
    if ratios:
        ax.set_xticks([r for r, _ in ratios], labels=[t for _, t in ratios], minor=False)
        ax.xaxis.set_minor_locator(__import__("matplotlib").ticker.NullLocator())
    ax.set_xlabel("activation ratio top_k / E")
    ax.set_ylabel(f"EL = C_dense / C_MoE at L_MoE(C = {lp._sci(c_max)})")
    ax.set_title(f"Efficiency Leverage ({int(CI * 100)} % bootstrap)")
    ax.legend(fontsize=8)
    lp._save(fig, out_dir / "el_vs_activation_ratio.png")

    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"summary: {out_dir / 'summary.txt'}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    jscale.cli.experiment(grid, analyze)
