"""The learning-rate rule of the IsoFLOP presets, measured: an lr sweep per size at one budget.

    python experiments/lr_rule.py --preset cpu --out results/lr_rule      # ~6 minutes on 2 CPU cores

Each size of ``experiments/isoflop.py``'s architecture rule (same shapes, warmup, schedule and eval
set) is trained at one compute budget with learning rates on a factor-√2 ladder around the preset's
rule ``lr = lr_ref · (N / n_ref)^(−lr_exponent)``. ``analyze`` fits a parabola in log lr to each
size's eval losses, reports the optimum, and fits ``lr* ∝ N^(−γ)`` through the optima, to compare
with the rule the IsoFLOP preset uses (N = non-embedding parameters + the output head).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

import jscale
import jscale.cli
from jscale import sweep

sys.path.insert(0, str(Path(__file__).resolve().parent))
import isoflop  # noqa: E402  (the sibling experiment whose rule this measures)

PILOTS = {
    # the middle cpu budget, four sizes across the cpu grid's range, five learning rates each
    "cpu": dict(iso="cpu", budget=3e11, n_params=[2.1e4, 5.2e4, 1.2e5, 3.3e5],
                factors=[0.5, 2 ** -0.5, 1.0, 2 ** 0.5, 2.0]),
    # the same at the gpu / tpu presets' second budget (they need --set data.path=...)
    "gpu": dict(iso="gpu", budget=3e17, n_params=[5e6, 1.5e7, 4.5e7],
                factors=[0.5, 2 ** -0.5, 1.0, 2 ** 0.5, 2.0]),
    "tpu": dict(iso="tpu", budget=1e20, n_params=[1e8, 4e8, 1.6e9],
                factors=[0.5, 2 ** -0.5, 1.0, 2 ** 0.5, 2.0]),
}


def grid(preset: str, overrides: dict | None = None) -> list:
    """Sizes × learning rates at one budget (presets: cpu, gpu, tpu)."""
    if preset not in PILOTS:
        raise jscale.ConfigError(f"--preset: must be one of {sorted(PILOTS)} (got {preset!r})")
    pilot = PILOTS[preset]
    # the IsoFLOP grid's base, shape rule, lr rule and warmup, at this pilot's budget and sizes
    runs = []
    for r in isoflop.sized_runs(pilot["iso"], [pilot["budget"]], overrides,
                                n_params=pilot["n_params"]):
        if isinstance(r, sweep.InvalidRun):
            runs.append(r)
            continue
        runs += [r.override({"optim.lr": f * r.optim.lr}) for f in pilot["factors"]]
    return runs


def analyze(df, out_dir: Path) -> None:
    """Per size: eval loss at each lr, the parabola's optimum; then ``lr* ∝ N^(−γ)``."""
    preset = next((k for k, v in isoflop.PRESETS.items()
                   if v["seq_len"] == int(df["train.seq_len"].iloc[0])), "cpu")
    p = isoflop.PRESETS[preset]
    ok = df[(df["status"] == "ok") & ~df["diverged"].astype(bool)]
    optima, lines = [], []
    for n, g in ok.groupby("n_params_with_head"):
        g = g.sort_values("optim.lr")
        x, y = np.log(g["optim.lr"].to_numpy(float)), g["final_eval_loss"].to_numpy(float)
        losses = " ".join(f"{lr:.2e}:{loss:.4f}" for lr, loss in zip(g["optim.lr"], y, strict=True))
        c = np.polyfit(x, y, 2) if len(x) >= 3 else None
        best = (math.exp(-c[1] / (2 * c[0])) if c is not None and c[0] > 0 else math.nan)
        inside = bool(np.isfinite(best) and x.min() < math.log(best) < x.max())
        optima.append((float(n), best, inside))
        lines.append(f"N = {n:>9,.0f}: {losses} | optimum {best:.3g}"
                     f"{'' if inside else ' (outside the swept range)'}; rule "
                     f"{isoflop.lr_for(n, p):.3g}")
    good = [(n, lr) for n, lr, inside in optima if inside]
    if len(good) >= 2:
        slope, icept = np.polyfit(np.log([n for n, _ in good]), np.log([lr for _, lr in good]), 1)
        lines.append(f"fit through the optima: lr* = {math.exp(icept) * p['n_ref'] ** slope:.3g} · "
                     f"(N / {p['n_ref']:.3g})^({slope:.3f}); the rule in use: {p['lr_ref']:.3g} · "
                     f"(N / {p['n_ref']:.3g})^({-p['lr_exponent']:.3f})")
    text = "\n".join(lines)
    print(text)
    out_dir = Path(out_dir)
    (out_dir / "lr_rule.txt").write_text(text + "\n")
    (out_dir / "lr_rule.json").write_text(json.dumps(
        [{"N": n, "lr_opt": lr, "inside": inside} for n, lr, inside in optima], indent=1) + "\n")


if __name__ == "__main__":
    jscale.cli.experiment(grid, analyze)
