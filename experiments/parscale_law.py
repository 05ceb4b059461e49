"""The parallel scaling law on jscale's own runs, and what parallel streams cost at inference.

    python experiments/parscale_law.py --preset cpu --out results/parscale_law   # ~12 min, 2 CPU cores
    python experiments/parscale_law.py --preset gpu --out results/parscale --set data.path=corpus.jsonl \
        --set data.tokenizer=bpe --set model.vocab_size=32768                    # one GPU, your corpus

After Chen et al., "Parallel Scaling Law for Language Models" (arXiv 2505.10475): models of several
sizes × P ∈ {1, 2, 4, 8} parallel streams (:mod:`jscale.models.parscale`), every run on the same
number of training tokens (the paper's design: P changes the compute per token, not the data).
``analyze`` fits the ParScale law ``L = (A / (N·(k·ln P + 1)))^α + E`` (``jscale.laws.fit_parscale``)
with bootstrap intervals on k, α, E, A and the multiplier ``k·ln P + 1``, draws loss vs N per P with
the fitted curves (the paper's figure), and checks how well a fit on P ≤ 4 predicts P = 8.

It then measures the **inference cost** of each P at batch 1: decode latency per token (median of
jitted :func:`jscale.models.decode_step` calls after a warm-up, prompt of ``prompt_tokens``) and memory
(parameters + the decode cache, bytes of the arrays themselves), against the dense model the fitted
law says reaches the same loss — ``N_dense = N·(k·ln P + 1)`` (the law's own equivalence), shaped by
the family's sizing rule — the paper's claim being that P streams cost far less memory and latency
than that parameter growth at batch 1.

Conventions, printed with every answer:

* loss: the final eval loss (``final_eval_loss``, nats per token on the ``train.eval_batches`` eval set);
* N: non-embedding parameters **including** the prefixes and the aggregator (``n_params_non_embedding``;
  the paper's accounting: its N grows slightly with P);
* tokens: the same for every run (``steps × batch × seq_len``; the epochs over the corpus are printed);
* intervals: 95 % percentile bootstrap over runs (``jscale.laws.uncertainty.bootstrap``);
* latency and memory: measured on this machine's default JAX device, random weights (decode cost does
  not depend on their values), float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import jscale
import jscale.cli
from jscale import sweep

#: The streams every size trains with.
STREAMS = (1, 2, 4, 8)

PRESETS = {
    # 4 sizes × 4 P = 16 runs of 300 steps × 8 × 64 tokens (154 k tokens, 0.02 epochs of the bundled
    # corpus), N ≈ 27 k – 0.5 M (P = 8 included).
    "cpu": dict(sizes=[(32, 2), (48, 2), (64, 3), (96, 3)], head_dim=16, n_prefix_tokens=16,
                seq_len=64, batch_size=8, steps=300, lr_ref=1.15e-2, n_ref=7e4, lr_exponent=0.31,
                eval_batches=32, prompt_tokens=16, decode_tokens=32),
    # One GPU, untimed: 5 sizes × 4 P = 20 runs of 20 k steps × 32 × 1024 tokens (0.66 B tokens
    # each), N ≈ 6 M – 0.2 B: needs a corpus of ≥ ~1 B tokens.
    "gpu": dict(sizes=[(256, 4), (384, 6), (512, 8), (768, 12), (1024, 16)], head_dim=64,
                n_prefix_tokens=48, seq_len=1024, batch_size=32, steps=20_000, lr_ref=8.5e-3,
                n_ref=7e4, lr_exponent=0.5, eval_batches=64, prompt_tokens=128, decode_tokens=128,
                corpus=True),
}
N_BOOT = 200
CI = 0.95
CONVENTIONS = (
    "conventions: loss = final eval loss (nats/token); N = non-embedding parameters incl. prefixes "
    "and aggregator (the paper's accounting); same training tokens for every run; 95 % bootstrap "
    "over runs; latency/memory at batch 1, float32, this machine's default device")


def base_config(preset: str, overrides: dict | None = None) -> jscale.RunConfig:
    """The preset's ParScale base run (sizes and P are set per run by :func:`grid`)."""
    if preset not in PRESETS:
        raise jscale.ConfigError(f"--preset: must be one of {sorted(PRESETS)} (got {preset!r})")
    p, overrides = PRESETS[preset], dict(overrides or {})
    if p.get("corpus") and not overrides.get("data.path"):
        raise jscale.ConfigError(
            f"data.path: the {preset} preset trains on far more tokens than the bundled corpus holds; "
            "give it your own corpus and tokenizer, e.g. --set data.path=/data/corpus.jsonl "
            "--set data.tokenizer=bpe --set model.vocab_size=32768")
    return jscale.presets.get("parscale-tiny").override({
        "model.n_prefix_tokens": p["n_prefix_tokens"], "model.max_seq_len": max(512, p["seq_len"]),
        "train.seq_len": p["seq_len"], "train.batch_size": p["batch_size"],
        "train.steps": p["steps"], "optim.schedule": "cosine",
        "optim.warmup_steps": max(1, p["steps"] // 20), "train.log_every": 50,
        "train.eval_every": 0, "train.eval_batches": p["eval_batches"],
        "train.checkpoint_every": 0, "train.seed": 0, **overrides})


def size_overrides(d_model: int, n_layers: int, head_dim: int) -> dict:
    heads = d_model // head_dim
    return {"model.d_model": d_model, "model.n_layers": n_layers, "model.n_heads": heads,
            "model.n_kv_heads": heads, "model.d_ff": 3 * d_model, "model.head_dim": None}


def grid(preset: str, overrides: dict | None = None) -> list:
    """Every size × P of the preset (cpu, gpu) on the same tokens; the learning rate by
    experiments/isoflop.py's rule at the size's base N (the same for every P of a size)."""
    base = base_config(preset, overrides)
    p = PRESETS[preset]
    if overrides and "model.n_streams" in overrides:
        raise jscale.ConfigError("model.n_streams: the study sets P itself (STREAMS); drop --set "
                                 "model.n_streams")
    runs = []
    for d, L in p["sizes"]:
        sized = base.override(size_overrides(d, L, p["head_dim"]))
        n = jscale.count_params(sized.model.base)["with_head"]
        lr = p["lr_ref"] * (n / p["n_ref"]) ** -p["lr_exponent"]
        runs += sweep.product(sized.override({"optim.lr": lr}), **{"model.n_streams": list(STREAMS)})
    return runs


# --- analysis ------------------------------------------------------------------------------------

def usable(df):
    """The finished, non-diverged runs with a final eval loss: N, P, loss and the model fields."""
    ok = df[(df.get("status") == "ok") & df["final_eval_loss"].notna()].copy()
    if "diverged" in ok:
        ok = ok[~ok["diverged"].fillna(False).astype(bool)]
    ok = ok[np.isfinite(ok["final_eval_loss"].astype(float))]
    ok["N"] = ok["n_params_non_embedding"].astype(float)
    ok["P"] = ok["model.n_streams"].astype(float)
    ok["loss"] = ok["final_eval_loss"].astype(float)
    return ok.sort_values(["N", "P"]).reset_index(drop=True)


def model_of(row):
    """A results row's model config (the ``model.*`` columns)."""
    from jscale.models.parscale import ParScaleConfig
    fields = {f.name for f in dataclasses.fields(ParScaleConfig)}
    kw = {k[6:]: row[k] for k in row if k.startswith("model.") and k[6:] in fields}
    kw = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in kw.items()}
    for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
              "n_streams", "n_prefix_tokens"):
        kw[k] = int(kw[k])
    if kw.get("head_dim") is not None:
        kw["head_dim"] = int(kw["head_dim"])
    kw["moe"] = None
    return ParScaleConfig(**kw)


def measure_decode(cfg, *, prompt_tokens: int, decode_tokens: int, seed: int = 0) -> dict:
    """Batch-1 decode of ``cfg`` with random weights: median seconds per token over
    ``decode_tokens`` jitted :func:`jscale.models.decode_step` calls (after ``prompt_tokens`` steps
    that fill the cache and compile), and the bytes of the parameters and of the decode cache."""
    import jax

    from jscale import models
    params = models.init(jax.random.PRNGKey(seed), cfg)
    max_len = prompt_tokens + decode_tokens
    cache = models.decode_init(params, cfg, 1, max_len)
    step = jax.jit(lambda p, t, c: models.decode_step(p, t, c, cfg), donate_argnums=2)
    token = jax.numpy.zeros((1,), jax.numpy.int32)
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    for _ in range(prompt_tokens):
        logits, cache = step(params, token, cache)
    jax.block_until_ready(logits)
    times = []
    for _ in range(decode_tokens):
        t0 = time.perf_counter()
        logits, cache = step(params, token, cache)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
        token = jax.numpy.argmax(logits, axis=-1).astype(jax.numpy.int32)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return {"latency_s": float(np.median(times)), "param_bytes": int(param_bytes),
            "cache_bytes": int(cache_bytes), "memory_bytes": int(param_bytes + cache_bytes)}


def dense_equivalent(cfg, multiplier: float):
    """The dense (P = 1) model of ``cfg``'s shape family with ``multiplier ×`` its non-embedding
    parameters: the model the ParScale law says reaches P streams' loss."""
    from jscale import models
    base = dataclasses.replace(cfg, n_streams=1)
    target = models.count_params(cfg)["non_embedding"] * multiplier
    return models.shape_for_params(target, base, count="non_embedding", count_rtol=0.5,
                                   head_dim=cfg.k, min_layers=cfg.n_layers)


def _holdout(runs, n_boot: int, seed: int) -> dict:
    """Fit on P ≤ 4, predict P = 8: per-run relative errors and the bootstrap range of each
    prediction."""
    from jscale import laws
    train, test = runs[runs["P"] <= 4], runs[runs["P"] > 4]
    if len(test) == 0 or train["P"].nunique() < 2:
        return {}
    fit = laws.fit_parscale(train["N"], train["P"], train["loss"])
    pred = fit.predict(test["N"].to_numpy(), test["P"].to_numpy())
    err = pred / test["loss"].to_numpy() - 1.0
    out = {"fit": fit.to_dict(), "P": test["P"].tolist(), "N": test["N"].tolist(),
           "observed": test["loss"].tolist(), "predicted": pred.tolist(),
           "rel_error": err.tolist(), "mean_abs_rel_error": float(np.mean(np.abs(err))),
           "max_abs_rel_error": float(np.max(np.abs(err)))}
    if n_boot:
        boot = laws.uncertainty.bootstrap(fit, n_boot, seed=seed, ci=CI)
        s = boot.samples
        preds = np.stack([(s["A"][i] / (test["N"].to_numpy() * (s["k"][i] * np.log(test["P"])
                                                                  + 1))) ** s["alpha"][i]
                          + s["E"][i] for i in range(len(s["E"]))])
        lo, hi = np.percentile(preds, [50 * (1 - CI), 50 * (1 + CI)], axis=0)
        out["predicted_interval"] = np.stack([lo, hi], 1).tolist()
    return out


def analyze(df, out_dir: Path, n_boot: int = N_BOOT, seed: int = 0,
            prompt_tokens: int | None = None, decode_tokens: int | None = None) -> dict:
    """The fit, its intervals, the P ≤ 4 → P = 8 check, the inference-cost table and the plots
    (see the module docstring); writes ``summary.txt``/``summary.json`` and returns the summary."""
    from jscale import laws
    from jscale.laws import plots as lp

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        print(line)

    echo("== ParScale: L = (A / (N (k ln P + 1)))^alpha + E on jscale's runs, and inference cost ==")
    echo(CONVENTIONS)
    runs = usable(df)
    if runs["P"].nunique() < 2 or len(runs) < 5:
        raise jscale.ConfigError(f"analyze: {len(runs)} usable runs over P = "
                                 f"{sorted(runs['P'].unique())}: the law needs ≥ 5 runs and ≥ 2 P")
    tokens = float(runs["tokens"].iloc[0]) if "tokens" in runs else float("nan")
    echo(f"{len(runs)} runs, P = {sorted(int(p) for p in runs['P'].unique())}, N = "
         f"{runs['N'].min():.3g} – {runs['N'].max():.3g}, {tokens:.3g} training tokens each "
         f"({float(runs['epochs'].max()) if 'epochs' in runs else float('nan'):.2f} epochs)")
    fit = laws.fit_parscale(runs["N"], runs["P"], runs["loss"])
    boot = laws.uncertainty.bootstrap(fit, n_boot, seed=seed, ci=CI) if n_boot else None
    iv = boot.intervals if boot is not None else {}
    echo(f"fit (all P): R² {fit.r2:.4f}, RMSE {fit.rmse:.4f}, {fit.n_converged}/{fit.n_starts} "
         "starts converged")
    for name in ("k", "alpha", "E", "A"):
        lo_hi = iv.get(name)
        extra = "" if lo_hi is None else f"  [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]"
        echo(f"  {name:>5} = {fit.params[name]:.4g}{extra}")
    loose = [n for n, (lo, hi) in iv.items() if n in fit.params and (lo <= 0 or hi / lo > 10)]
    trusted = fit.r2 >= 0.95 and not loose
    if not trusted:
        echo(f"  CAUTION: this fit does not pin the law down (R² {fit.r2:.3f}"
             + (f"; 95 % intervals spanning > 10x: {', '.join(loose)}" if loose else "")
             + "): the runs' noise is comparable to the loss differences between sizes and P. "
             "Read k·ln P + 1 and the P = 8 prediction as this grid's, not as constants; more "
             "sizes, more tokens or seeds narrow them.")
    multiplier = {}
    for P in sorted(runs["P"].unique()):
        m = fit.params["k"] * math.log(P) + 1.0
        row = {"multiplier": m}
        if boot is not None:
            ms = boot.samples["k"] * math.log(P) + 1.0
            row["interval"] = np.percentile(ms, [50 * (1 - CI), 50 * (1 + CI)]).tolist()
        multiplier[f"{P:g}"] = row
    echo("  parameter multiplier k ln P + 1: " + ", ".join(
        f"P={p}: {r['multiplier']:.3f}" + (f" [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]"
                                           if "interval" in r else "")
        for p, r in multiplier.items()))
    hold = _holdout(runs, n_boot, seed)
    if hold:
        echo(f"fit on P <= 4 predicts P = 8: mean |error| {100 * hold['mean_abs_rel_error']:.2f} %, "
             f"max {100 * hold['max_abs_rel_error']:.2f} % over {len(hold['P'])} runs")
    plots = [lp.parscale_curves(fit, out_dir / "loss_vs_n.png"),
             lp.fit_vs_observed(fit, out_dir / "fit_vs_observed.png")]

    # --- inference cost ---
    p_cpu = PRESETS["cpu"]
    prompt_tokens = prompt_tokens or p_cpu["prompt_tokens"]
    decode_tokens = decode_tokens or p_cpu["decode_tokens"]
    echo(f"inference at batch 1 ({prompt_tokens}-token prompt, median of {decode_tokens} decode "
         "steps): P streams vs the dense model of N·(k ln P + 1) parameters (same predicted loss)")
    echo(f"{'N':>9} {'P':>2} {'L_pred':>7} {'ms/tok':>7} {'MB':>7} | {'N_dense':>9} "
         f"{'ms/tok':>7} {'MB':>7} | latency x  memory x")
    cost = []
    for _, g in runs.groupby("model.d_model"):
        for row in g.sort_values("P").to_dict("records"):
            cfg = model_of(row)
            P = cfg.n_streams
            m = fit.params["k"] * math.log(P) + 1.0
            mine = measure_decode(cfg, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens)
            dense_cfg = dense_equivalent(cfg, m) if P > 1 else dataclasses.replace(cfg)
            dense = (measure_decode(dense_cfg, prompt_tokens=prompt_tokens,
                                    decode_tokens=decode_tokens) if P > 1 else mine)
            n_dense = jscale.count_params(dense_cfg)["non_embedding"]
            entry = {"d_model": cfg.d_model, "N": row["N"], "P": P,
                     "loss_pred": float(fit.predict(row["N"], P)),
                     **{f"parscale_{k}": v for k, v in mine.items()},
                     "dense_N": n_dense, "dense_shape": jscale.models.describe(dense_cfg),
                     **{f"dense_{k}": v for k, v in dense.items()}}
            cost.append(entry)
            echo(f"{row['N']:>9.3g} {P:>2} {entry['loss_pred']:>7.4f} "
                 f"{1e3 * mine['latency_s']:>7.3f} {mine['memory_bytes'] / 2**20:>7.3f} | "
                 f"{n_dense:>9.3g} {1e3 * dense['latency_s']:>7.3f} "
                 f"{dense['memory_bytes'] / 2**20:>7.3f} | "
                 f"{mine['latency_s'] / dense['latency_s']:>9.2f} "
                 f"{mine['memory_bytes'] / dense['memory_bytes']:>8.2f}")
    plots.append(_cost_plot(cost, out_dir / "inference_cost.png"))
    summary = {"conventions": CONVENTIONS, "fit": fit.to_dict(), "trusted": trusted,
               "bootstrap": None if boot is None else boot.to_dict(),
               "parameter_multiplier": multiplier, "holdout_p8": hold, "inference": cost,
               "plots": plots}
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"summary: {out_dir / 'summary.txt'}", file=sys.stderr)
    return summary


def _cost_plot(cost: list[dict], path: Path) -> str:
    """Latency and memory relative to the same size's P = 1 model: P streams (solid) against the
    dense model the law equates with them, of ``N·(k ln P + 1)`` parameters (dashed) — the paper's
    inference-cost comparison."""
    from jscale.laws import plots as lp
    fig, axes = lp._new(2)
    sizes = sorted({c["d_model"] for c in cost})
    for ax, key, label in ((axes[0], "latency_s", "batch-1 decode latency / P = 1"),
                           (axes[1], "memory_bytes", "memory (params + cache) / P = 1")):
        for i, d in enumerate(sizes):
            rows = sorted((c for c in cost if c["d_model"] == d), key=lambda c: c["P"])
            ref = rows[0][f"parscale_{key}"]
            Ps = [c["P"] for c in rows]
            n0 = rows[0]["N"]
            ax.plot(Ps, [c[f"parscale_{key}"] / ref for c in rows], "o-", color=f"C{i}",
                    label=f"ParScale, N={n0:.2g}")
            ax.plot(Ps, [c[f"dense_{key}"] / ref for c in rows], "s--", color=f"C{i}", alpha=0.6,
                    label=f"dense of N(k ln P+1), N={n0:.2g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("P (streams)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("Inference cost at batch 1: P streams vs the dense model of equal predicted loss")
    return lp._save(fig, path)


if __name__ == "__main__":
    jscale.cli.experiment(grid, analyze)
