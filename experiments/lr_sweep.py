"""Learning rate × seed at a fixed model size: the classic vmapped sweep.

    python experiments/lr_sweep.py --preset cpu --out runs/lr_sweep
    jscale sweep experiments/lr_sweep.py --preset cpu --out runs/lr_sweep

All runs share one shape, so they form one group: one compiled program trains every learning rate and
seed together (``vmap`` over runs) where that is faster than one at a time. ``analyze`` plots final
validation loss against learning rate (mean over seeds, each seed a dot) and prints the best.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jscale
import jscale.cli
from jscale import sweep

PRESETS = {
    # ~7 minutes on 2 CPU cores: the tiny model, 10 runs of 200 steps.
    "cpu": dict(model="tiny", steps=200, lrs=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], seeds=[0, 1]),
    # One GPU: the small model, 24 runs of 2,000 steps.
    "gpu": dict(model="small", steps=2000, lrs=[2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2],
                seeds=[0, 1, 2]),
}


def grid(preset: str) -> list:
    """Learning rate × seed around a preset model (presets: cpu, gpu)."""
    if preset not in PRESETS:
        raise jscale.ConfigError(f"--preset: must be one of {sorted(PRESETS)} (got {preset!r})")
    p = PRESETS[preset]
    base = jscale.presets.get(p["model"]).override({
        "train.steps": p["steps"], "train.eval_every": p["steps"] // 4,
        "train.log_every": max(1, p["steps"] // 20), "optim.warmup_steps": p["steps"] // 10})
    return sweep.product(base, **{"optim.lr": p["lrs"], "train.seed": p["seeds"]})


def split(df):
    """``(ok, diverged, failed)`` rows: finished and healthy, finished but diverged, and failed
    (never trained: their ``diverged`` is missing, which is not a divergence)."""
    finished = df["status"] == "ok"
    diverged = finished & (df["diverged"].eq(True) if "diverged" in df else False)
    return df[finished & ~diverged], df[diverged], df[~finished]


def analyze(df, out_dir: Path) -> None:
    """Plot final eval loss vs learning rate to ``out_dir/lr_sweep.png`` and print the best lr."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok, diverged, failed = split(df)
    if ok.empty:
        print("lr_sweep: no finished runs to analyze", file=sys.stderr)
        return
    by_lr = ok.groupby("optim.lr")["final_eval_loss"].agg(["mean", "min", "max", "count"])
    best_lr = float(by_lr["mean"].idxmin())
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter(ok["optim.lr"], ok["final_eval_loss"], s=14, alpha=0.5, label="one seed")
    ax.plot(by_lr.index, by_lr["mean"], "o-", label="mean over seeds")
    ax.axvline(best_lr, color="gray", ls=":", label=f"best lr {best_lr:.3g}")
    for lr in diverged["optim.lr"]:
        ax.axvline(lr, color="red", alpha=0.3)
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss (nats/token)",
           title=f"lr sweep: {int(ok['n_params'].iloc[0]):,} params, "
                 f"{int(ok['tokens'].iloc[0]):,} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "lr_sweep.png")
    plt.close(fig)
    print(by_lr.to_string(float_format=lambda x: f"{x:.4f}"))
    print(f"best lr {best_lr:.3g}: mean final eval loss {by_lr['mean'].min():.4f} "
          f"({len(diverged)} diverged, {len(failed)} failed); plot: {out_dir / 'lr_sweep.png'}")


if __name__ == "__main__":
    jscale.cli.experiment(grid, analyze)
