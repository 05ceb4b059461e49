"""The growth study: a small model grown by G_stack (and other operators) vs the target trained from
scratch, at equal total training FLOPs, and the paper's speed-up.

    python experiments/stacking.py --preset cpu --out results/stacking       # ~15 min, 2 CPU cores
    python experiments/stacking.py --preset gpu --out results/stacking --set data.path=corpus.jsonl \
        --set data.tokenizer=bpe --set model.vocab_size=32768                 # one GPU, your corpus

After Du et al., "Stacking Your Transformers: A Closer Look at Model Growth for Efficient LLM
Pre-Training" (arXiv 2405.15319), scaled down. The target is a dense transformer of ``n_layers``
layers trained from scratch for ``steps`` steps (the budget B = its training FLOPs). For every growth
factor g and every fraction f of the budget's tokens, a model of ``n_layers / g`` layers (otherwise
the target's shape) trains on d = f · D tokens, is grown into the target by the depth operator
(the grown run's ``growth`` section, ``stack:g``; :func:`jscale.train.train` with ``grow_from``),
and the grown model trains for the steps that bring the total — small model and growth included —
to B (to within half a target step). At one setting ``(g, f) = op_setting`` every other operator of
:data:`jscale.growth.OPERATORS` is compared with ``stack``: ``interpolate``, ``zero`` (identity new
layers, interleaved), ``random`` (fresh new layers blended in over the first ``grow_fraction`` of
the grown run), ``learn`` (LiGO, ``learn_steps`` steps whose compute counts in the total) and
``direct_width`` (from a source of 1/g the width and the full depth). Every setting runs with
every seed; each run has its own directory under
``--out`` (``scratch-seed0/``, ``small-g2-d<tokens>-seed0/``, ``grown-stack-g2-d<tokens>-seed0/``), so
a rerun skips finished runs and resumes unfinished ones.

``analyze`` draws eval loss against cumulative FLOPs (the paper's figure: a grown run's curve starts
at its small model's FLOPs) and computes, per seed, the **speed-up** ``(C_s(L_g) − C_g) / C_g``: the
FLOPs ``C_s(L_g)`` the scratch run of the same seed needed to reach the grown run's final loss
``L_g``, relative to the grown run's total ``C_g`` (tokens likewise, with the grown run's total
tokens, small model's included). When the scratch run never reaches ``L_g``, the speed-up is only
bounded below by its whole budget: reported ``> x``. Because every grown run spends the scratch
budget, that bound is ≈ 0 exactly when growth helps; so beside it is the paper's Fig. 1 reading
``(C_scratch − C_g(L_s)) / C_g(L_s)``, with ``C_g(L_s)`` where the grown run's own curve first
reaches the scratch run's final loss ``L_s`` (``< x`` when it never does), and the loss gap at equal
compute ``L_scratch(C_g) − L_g`` (> 0: growth helped), always defined.

Conventions, printed with every answer:

* loss: the final eval loss (``final_eval_loss``, nats/token on ``train.eval_batches`` fixed windows of
  the validation split); curves: the eval loss every ``eval_every`` steps (``metrics.jsonl``);
* FLOPs: jscale's ``flops_per_token(cfg)["training"] × tokens`` (matmul FLOPs); a grown run's total
  counts its small model's training (``lineage.json``'s ``source_flops``, ``summary.json``'s
  ``total_flops``);
* C_s(L): the first crossing of the scratch curve below L, interpolated linearly in log FLOPs between
  eval points. The scratch curve's intermediate points come from one cosine schedule over the whole
  budget (mid-schedule, higher learning rate), as the paper's curves do: a scratch run sized for that
  smaller budget would do somewhat better, so speed-ups from intermediate points lean high (and the
  Fig. 1 reading, from the grown run's intermediate points, leans low);
* seeds: grown seed s is compared with scratch seed s; intervals are min–max over seeds (2 seeds: a
  range, not a confidence interval); a seed's grown run reads the data in another order
  (``train.seed = 1000 + s``) than its small model, so it does not replay the small model's batches;
* every run: the same learning rate, cosine schedule and warmup rule; fresh AdamW state after growth;
  a grown run's total FLOPs include G_learn's LiGO steps (``growth_flops``: learn_steps × the
  target's training FLOPs per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

import jscale
from jscale import growth, models
from jscale.config import ConfigError, parse_overrides

#: The operators compared with G_stack at ``op_setting``: the other depth operators, and
#: ``direct_width`` from a source of 1/g the width (d_model, heads, d_ff) and the target's depth.
OPERATORS = ("interpolate", "zero", "random", "learn", "direct_width")
PRESETS = {
    # 2 scratch + 10 small + 18 grown = 30 runs, 600 target steps × 8 × 64 tokens (0.31 M tokens,
    # 0.03 epochs of the bundled corpus); the operator comparison at g 2, f 0.25: interpolate, zero,
    # random (blended in over a tenth of the grown run), learn (20 LiGO steps), direct_width (a
    # half-width source). Measured 10 min 41 s wall on 2 idle CPU cores, analysis included (16.6
    # CPU-minutes; 20 min 27 s beside other jobs, the same results bitwise).
    "cpu": dict(d_model=64, n_layers=4, head_dim=16, seq_len=64, batch_size=8, steps=600, lr=8e-3,
                warmup=30, eval_every=30, eval_batches=16, factors=(2, 4), fractions=(0.1, 0.25),
                seeds=(0, 1), operators=OPERATORS, op_setting=(2, 0.25), checkpoint_every=0,
                grow_fraction=0.1, learn_steps=20),
    # One GPU, untimed: d 512, 8 layers (N ≈ 27 M non-embedding), 10 k steps × 32 × 1024 tokens
    # (0.33 B tokens per budget; 3 fractions × 2 factors + 5 operators, 2 seeds: 22 grown runs;
    # ~18 budgets of ~6e16 FLOPs in all). Checkpoints every 1,000 steps, so a killed run resumes.
    "gpu": dict(d_model=512, n_layers=8, head_dim=64, seq_len=1024, batch_size=32, steps=10_000,
                lr=3e-3, warmup=500, eval_every=250, eval_batches=32, factors=(2, 4),
                fractions=(0.05, 0.1, 0.2), seeds=(0, 1), operators=OPERATORS,
                op_setting=(2, 0.1), checkpoint_every=1000, corpus=True, grow_fraction=0.1,
                learn_steps=100),
}
#: Fields the study sets itself per run (``--set`` may not change them).
STUDY_FIELDS = ("model.n_layers", "train.steps", "train.seed", "optim.warmup_steps")
#: Added to a seed for the grown run's data order (its init comes from the small model).
GROWN_SEED_OFFSET = 1000
CONVENTIONS = (
    "conventions: loss = final eval loss (nats/token); FLOPs = jscale flops_per_token(cfg)['training']"
    " x tokens, a grown run's total includes its small model's training; speed-up = (C_s(L_g) - C_g)"
    " / C_g, C_s(L) = first crossing of the same seed's scratch eval curve below L (linear in log "
    "FLOPs; mid-schedule points of one cosine run, so it leans high), '>' = scratch never reached L_g"
    " (lower bound from its whole budget); Fig.1 reading = (C_scratch - C_g(L_s)) / C_g(L_s), C_g(L_s)"
    " = where the grown run's own curve first reaches the scratch's final loss (leans low), '<' = "
    "never reached; loss gap = L_scratch(C_g) - L_g (> 0: growth helped); intervals = min-max over "
    "seeds, paired by seed; total FLOPs include G_learn's LiGO steps")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the study: ``kind`` is ``"scratch"``, ``"small"`` or ``"grown"``; ``source`` names
    a grown run's small model; ``op``, ``g`` and ``d`` (the small model's tokens) are ``None`` for
    the scratch run."""

    name: str
    kind: str
    cfg: jscale.RunConfig
    seed: int
    op: str | None = None
    g: int | None = None
    d: int | None = None
    source: str | None = None


def target_config(preset: str, overrides: dict | None = None) -> jscale.RunConfig:
    """The preset's target (scratch) run, seed 0, with ``overrides``; the ``gpu`` preset refuses to
    run without a user corpus (``data.path``), and the fields the study sets are refused."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset: must be one of {sorted(PRESETS)} (got {preset!r})")
    p, overrides = PRESETS[preset], dict(overrides or {})
    if p.get("corpus") and not overrides.get("data.path"):
        raise ConfigError(
            f"data.path: the {preset} preset trains on far more tokens than the bundled corpus holds; "
            "give it your own corpus and tokenizer, e.g. --set data.path=/data/corpus.jsonl "
            "--set data.tokenizer=bpe --set model.vocab_size=32768")
    taken = sorted(set(overrides) & set(STUDY_FIELDS))
    if taken:
        raise ConfigError(f"{taken[0]}: the study sets it per run; change PRESETS[{preset!r}] "
                          "in experiments/stacking.py instead")
    heads = p["d_model"] // p["head_dim"]
    return jscale.presets.get("tiny").override({
        "model.d_model": p["d_model"], "model.n_layers": p["n_layers"], "model.n_heads": heads,
        "model.n_kv_heads": heads, "model.d_ff": 3 * p["d_model"],
        "model.max_seq_len": max(512, p["seq_len"]), "train.seq_len": p["seq_len"],
        "train.batch_size": p["batch_size"], "train.steps": p["steps"], "optim.lr": p["lr"],
        "optim.schedule": "cosine", "optim.warmup_steps": _warmup(p["steps"], p),
        "train.log_every": p["eval_every"], "train.eval_every": p["eval_every"],
        "train.eval_batches": p["eval_batches"], "train.checkpoint_every": p["checkpoint_every"],
        "train.seed": 0,
        **overrides})


def _warmup(steps: int, p: dict) -> int:
    """The warmup rule of every run: the preset's ``warmup`` steps, at most a tenth of the run."""
    return max(1, min(p["warmup"], steps // 10))


def training_fpt(cfg: jscale.RunConfig) -> float:
    """Training FLOPs per token of ``cfg``'s model (jscale's count)."""
    return float(models.flops_per_token(cfg.model, cfg.train.seq_len)["training"])


def plan(preset: str, overrides: dict | None = None) -> list[Run]:
    """Every run of the study in the order they must train (a small model before its grown runs),
    each grown run sized so that small + growth + grown FLOPs equal the scratch run's (module
    docstring). A grown run's config carries its ``growth`` section, whose
    :meth:`~jscale.config.RunConfig.source_config` is exactly its small run's config."""
    p = PRESETS[preset]
    target = target_config(preset, overrides)
    tps = target.train.batch_size * target.train.seq_len
    budget = training_fpt(target) * tps * target.train.steps
    settings = [("stack", g, f) for g in p["factors"] for f in p["fractions"]]
    settings += [(op, *p["op_setting"]) for op in p["operators"]]
    runs = []
    for seed in p["seeds"]:
        runs.append(Run(f"scratch-seed{seed}", "scratch", target.override({"train.seed": seed}),
                        seed))
        smalls = {}
        for op, g, f in settings:
            if target.model.n_layers % g:
                raise ConfigError(f"model.n_layers: growth factor {g} needs a multiple of {g} "
                                  f"(got {target.model.n_layers})")
            small_steps = max(1, round(f * target.train.steps))
            d = small_steps * tps
            width = op == "direct_width"
            shape = (_narrower(target, g) if width
                     else {"model.n_layers": target.model.n_layers // g})
            small_name = f"small-{'w' if width else 'g'}{g}-d{d}-seed{seed}"
            if small_name not in smalls:
                small = target.override({**shape, "train.steps": small_steps, "train.seed": seed,
                                         "optim.warmup_steps": _warmup(small_steps, p)})
                smalls[small_name] = small
                runs.append(Run(small_name, "small", small, seed, g=g, d=d))
            learn = p["learn_steps"] if op == "learn" else None
            left = (budget - training_fpt(smalls[small_name]) * d
                    - (learn or 0) * training_fpt(target) * tps)
            steps = round(left / (training_fpt(target) * tps))
            if steps < 1:
                raise ConfigError(f"{preset}: fraction {f} leaves no steps for the grown run")
            source = [f"train.seed={seed}", f"optim.warmup_steps={_warmup(small_steps, p)}"]
            if width:
                source += [f"{k}={v}" for k, v in shape.items()]
            cfg = target.override({
                "train.steps": steps, "train.seed": GROWN_SEED_OFFSET + seed,
                "optim.warmup_steps": _warmup(steps, p),
                "growth.op": op if width else f"{op}:{g}", "growth.source_steps": small_steps,
                "growth.source": tuple(source), "growth.learn_steps": learn,
                "growth.grow_steps": (max(1, round(p["grow_fraction"] * steps)) if op == "random"
                                      else 0)})
            assert cfg.source_config() == smalls[small_name], "the growth section's source"
            runs.append(Run(f"grown-{op}-g{g}-d{d}-seed{seed}", "grown", cfg, seed, op, g, d,
                            small_name))
    return runs


def _narrower(target: jscale.RunConfig, g: int) -> dict:
    """The overrides of a source ``g`` times narrower than ``target`` (d_model, the heads — the
    head dim kept — and d_ff), for ``direct_width``."""
    m = target.model
    for name in ("d_model", "n_heads", "n_kv_heads", "d_ff"):
        if getattr(m, name) % g:
            raise ConfigError(f"model.{name}: direct_width by {g} needs a multiple of {g} "
                              f"(got {getattr(m, name)})")
    return {"model.d_model": m.d_model // g, "model.n_heads": m.n_heads // g,
            "model.n_kv_heads": m.n_kv_heads // g, "model.d_ff": m.d_ff // g,
            "model.head_dim": m.head_dim or m.d_model // m.n_heads}


def execute(runs: list[Run], out_dir: Path, *, quiet: bool = True) -> None:
    """Train every run of ``runs`` into ``out_dir/<name>`` (finished runs are skipped by
    :func:`jscale.train.train`; a grown run is grown from its small model's final checkpoint by
    its ``growth`` section)."""
    from jscale.train import train

    for i, r in enumerate(runs):
        t0 = time.perf_counter()
        s = train(r.cfg, out_dir / r.name, quiet=True,
                  grow_from=out_dir / r.source if r.kind == "grown" else None)
        if not quiet:
            print(f"[{i + 1}/{len(runs)}] {r.name}: eval loss {s['final_eval_loss']:.4f}, "
                  f"{r.cfg.train.steps} steps, {time.perf_counter() - t0:.1f} s", file=sys.stderr)


# --- analysis --------------------------------------------------------------------------------------

_NAME = re.compile(r"^(?:(scratch)|(small)-[gw](\d+)-d(\d+)|grown-(\w+?)-g(\d+)-d(\d+))-seed(\d+)$")


def load_runs(out_dir: Path) -> list[dict]:
    """Every finished run under ``out_dir``: its name's fields (kind, op, g, d, seed), summary and
    eval curve ``(C, tokens, loss)`` — cumulative FLOPs and tokens, source's included."""
    found = []
    for path in sorted(Path(out_dir).iterdir()):
        m = _NAME.match(path.name)
        if not (m and (path / "summary.json").exists()):
            continue
        s = json.loads((path / "summary.json").read_text())
        kind = "scratch" if m[1] else "small" if m[2] else "grown"
        c0, t0 = ((s["source_flops"] + s.get("growth_flops", 0.0), s["source_tokens"])
                  if kind == "grown" else (0.0, 0))
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        rows = [r for r in rows if r.get("eval_loss") is not None]
        found.append(dict(
            name=path.name, kind=kind, op=m[5], g=int(m[3] or m[6] or 0) or None,
            d=int(m[4] or m[7] or 0) or None, seed=int(m[8]), summary=s,
            loss=float(s["final_eval_loss"]),
            C_total=float(s.get("total_flops", s["flops"])),
            T_total=float(s.get("total_tokens", s["tokens"])),
            curve=np.array([(c0 + s["flops_per_token"] * r["tokens"], t0 + r["tokens"],
                             r["eval_loss"]) for r in rows], float).reshape(-1, 3)))
    return found


def crossing(curve: np.ndarray, loss: float) -> tuple[float, float, str]:
    """``(C, tokens, flag)`` where ``curve`` (rows ``C, tokens, loss``) first reaches ``loss``,
    interpolated linearly in log C (and log tokens) between the bracketing eval points. ``flag``:
    ``""`` a crossing; ``">"`` never reached (C and tokens are the curve's last point: a lower
    bound); ``"<"`` already below at the first eval point (an upper bound)."""
    below = np.nonzero(curve[:, 2] <= loss)[0]
    if below.size == 0:
        return float(curve[-1, 0]), float(curve[-1, 1]), ">"
    j = int(below[0])
    if j == 0:
        return float(curve[0, 0]), float(curve[0, 1]), "<"
    (c0, t0, l0), (c1, t1, l1) = curve[j - 1], curve[j]
    w = (l0 - loss) / (l0 - l1)
    return (float(math.exp((1 - w) * math.log(c0) + w * math.log(c1))),
            float(math.exp((1 - w) * math.log(t0) + w * math.log(t1))), "")


def loss_at(curve: np.ndarray, c: float) -> float:
    """The curve's loss at FLOPs ``c`` (linear in log C; clamped to its first and last points)."""
    return float(np.interp(math.log(c), np.log(curve[:, 0]), curve[:, 2]))


def _fmt(stat: dict, key: str = "mean") -> str:
    """``stat[key]`` as ``+0.123``, prefixed ``>``/``<`` when it is a bound."""
    return f"{stat.get(key + '_flag', '')}{stat[key]:+.3f}"


#: A bound on C flips into the opposite bound on a quantity that falls with C.
_FLIP = {"": "", ">": "<", "<": ">"}


def _setting(entries: list[dict]) -> dict:
    """Seeds of one setting aggregated: mean, min and max of the loss, the speed-ups and the loss
    gap. A speed-up's mean is flagged ``>``/``<`` when any seed's value is a bound of that kind
    (``><`` for both), its min and max with the flag of the seed they come from."""
    out = {"seeds": [e["seed"] for e in entries], "per_seed": entries}
    for k in ("loss", "speedup", "token_speedup", "paper_speedup", "loss_gap"):
        v = np.array([e[k] for e in entries], float)
        out[k] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
        fk = {"speedup": "flag", "token_speedup": "flag", "paper_speedup": "paper_flag"}.get(k)
        if fk:
            flags = [e[fk] for e in entries]
            out[k].update(mean_flag="".join(sorted(set(flags) - {""})),
                          min_flag=flags[int(v.argmin())], max_flag=flags[int(v.argmax())])
    return out


def compare(grown: dict, scratch: dict) -> dict:
    """One grown run against the scratch run of its seed (rows of :func:`load_runs`): the speed-up
    ``(C_s(L_g) − C_g) / C_g`` and in tokens (``flag``: ``>``/``<`` a lower/upper bound), the paper's
    Fig. 1 reading ``(C_scratch − C_g(L_s)) / C_g(L_s)`` — ``C_g(L_s)`` where the grown run's own
    curve first reaches the scratch run's final loss (``paper_flag``) — and the loss gap at equal
    compute ``L_scratch(C_g) − L_g``."""
    c, t, flag = crossing(scratch["curve"], grown["loss"])
    c2, _, flag2 = crossing(grown["curve"], scratch["loss"])
    return dict(seed=grown["seed"], loss=grown["loss"], C=grown["C_total"], tokens=grown["T_total"],
                C_scratch=c, tokens_scratch=t, flag=flag,
                speedup=(c - grown["C_total"]) / grown["C_total"],
                token_speedup=(t - grown["T_total"]) / grown["T_total"],
                C_grown_at_scratch_loss=c2, paper_speedup=(scratch["C_total"] - c2) / c2,
                paper_flag=_FLIP[flag2],
                loss_gap=loss_at(scratch["curve"], grown["C_total"]) - grown["loss"],
                budget_ratio=grown["C_total"] / scratch["C_total"])


def analyze(out_dir: Path) -> dict:
    """Speed-ups, best d per g, the operator comparison, the guideline, plots and the summary
    (``summary.txt``, ``summary.json``, ``loss_vs_flops.png``) from the runs in ``out_dir``."""
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    lines: list[str] = []

    def echo(line: str = "") -> None:
        lines.append(line)
        print(line)

    echo("== Growth study (Du et al. 2024, arXiv 2405.15319): grown vs scratch at equal total FLOPs ==")
    echo(CONVENTIONS)
    scratch = {r["seed"]: r for r in runs if r["kind"] == "scratch"}
    if not scratch:
        raise ValueError(f"stacking: no finished scratch run in {out_dir}")
    settings: dict[tuple, list] = {}
    for r in (r for r in runs if r["kind"] == "grown"):
        if r["seed"] not in scratch:
            echo(f"{r['name']}: no scratch run of seed {r['seed']}; skipped")
            continue
        settings.setdefault((r["op"], r["g"], r["d"]), []).append(compare(r, scratch[r["seed"]]))
    agg = {k: _setting(v) for k, v in sorted(settings.items(),
                                             key=lambda kv: (kv[0][1], kv[0][2], kv[0][0] != "stack"))}
    sl = np.array([s["loss"] for s in scratch.values()])
    target = next(iter(scratch.values()))["summary"]
    echo(f"scratch: {len(scratch)} seeds, C = {target['flops']:.3g} FLOPs, D = {target['tokens']:,} "
         f"tokens, N = {target['n_params']:,} params; final loss {sl.mean():.4f} "
         f"[{sl.min():.4f}, {sl.max():.4f}]")
    echo(f"{'operator':12s} {'g':>2s} {'d tokens':>9s} {'C/C_scr':>7s} {'final loss [min, max]':>24s} "
         f"{'speed-up FLOPs [min, max]':>28s} {'tokens':>7s} {'Fig.1 reading [min, max]':>28s} "
         f"{'loss gap [min, max]':>25s}")
    for (op, g, d), s in agg.items():
        ratio = np.mean([e["budget_ratio"] for e in s["per_seed"]])
        sp, ps, lg, lo = s["speedup"], s["paper_speedup"], s["loss_gap"], s["loss"]
        echo(f"{op:12s} {g:2d} {d:9,d} {ratio:7.4f} {lo['mean']:8.4f} [{lo['min']:.4f}, "
             f"{lo['max']:.4f}] {_fmt(sp):>8s} [{_fmt(sp, 'min')}, {_fmt(sp, 'max')}] "
             f"{_fmt(s['token_speedup']):>7s} {_fmt(ps):>8s} [{_fmt(ps, 'min')}, {_fmt(ps, 'max')}]"
             f" {lg['mean']:+.4f} [{lg['min']:+.4f}, {lg['max']:+.4f}]")
        echo("    per seed: " + "; ".join(
            f"seed {e['seed']}: {e['flag']}{e['speedup']:+.3f} (Fig.1 {e['paper_flag']}"
            f"{e['paper_speedup']:+.3f})" for e in s["per_seed"]))
    summary = {"conventions": CONVENTIONS, "scratch": {
        "seeds": sorted(scratch), "flops": target["flops"], "tokens": target["tokens"],
        "n_params": target["n_params"], "loss": [scratch[k]["loss"] for k in sorted(scratch)]},
        "settings": [{"op": op, "g": g, "d": d, **s} for (op, g, d), s in agg.items()],
        "best_d": {}, "not_built": []}

    echo("best d per g (G_stack; lowest mean final loss, every run at the same total FLOPs):")
    guide = growth.growth_tokens(target["n_params"], target["tokens"])
    for g in sorted({g for op, g, _ in agg if op == "stack"}):
        cands = {d: s for (op, gg, d), s in agg.items() if op == "stack" and gg == g}
        best = min(cands, key=lambda d: cands[d]["loss"]["mean"])
        b = cands[best]
        others = [s for d, s in cands.items() if d != best]
        resolved = all(s["loss"]["min"] > b["loss"]["max"] for s in others)
        echo(f"  g={g}: best d = {best:,} tokens ({best / target['tokens']:.3g} of D), loss "
             f"{b['loss']['mean']:.4f}, speed-up {_fmt(b['speedup'])} (Fig.1 reading "
             f"{_fmt(b['paper_speedup'])}); "
             + ("the only d" if not others else "seed ranges disjoint from the other d's"
                if resolved else "seed ranges overlap another d's: not resolved by these seeds"))
        summary["best_d"][str(g)] = {"d": best, "resolved": resolved}
    echo(f"  guideline (growth_tokens(N={target['n_params']:,} total params, D={target['tokens']:,}), "
         "the paper's "
         f"Eq. 2): d = {guide:.3g} tokens = {guide / target['tokens']:.3g} x D. The guideline was "
         "fitted at the paper's scale (billions of parameters, up to 7B); here it is extrapolated "
         f"{math.log10(7e9 / target['n_params']):.1f} decades below in N and is not expected to hold.")
    summary["guideline_d"] = guide

    ops = sorted({(g, d) for op, g, d in agg if op != "stack"})
    for g, d in ops:
        echo(f"operators at g={g}, d={d:,} (final loss mean [min, max]; speed-ups, mean):")
        for (op, gg, dd), s in agg.items():
            if (gg, dd) == (g, d):
                echo(f"  {op:12s} {s['loss']['mean']:.4f} [{s['loss']['min']:.4f}, "
                     f"{s['loss']['max']:.4f}]  speed-up {_fmt(s['speedup'])}, Fig.1 reading "
                     f"{_fmt(s['paper_speedup'])}")
    for name, o in growth.OPERATORS.items():
        if not o.supported:
            echo(f"  {name} (G_{name}): not built in jscale.growth (supported=False): not compared")
            summary["not_built"].append(name)
    _plot(runs, agg, out_dir)
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"summary: {out_dir / 'summary.txt'}", file=sys.stderr)
    return summary


def _plot(runs: list[dict], agg: dict, out_dir: Path) -> None:
    """``loss_vs_flops.png``: one panel per growth factor (G_stack, every d) and one per operator
    setting; scratch curves in black, a grown run's small model dashed, the grown run solid."""
    import matplotlib

    from jscale.laws import plots as lp
    panels = [("stack", g, None) for g in sorted({g for op, g, _ in agg if op == "stack"})]
    panels += [("ops", g, d) for g, d in sorted({(g, d) for op, g, d in agg if op != "stack"})]
    if not panels:
        return
    fig, axes = lp._new(ncols=len(panels), width=5.2)
    cmap = matplotlib.colormaps["tab10"]
    by_name = {r["name"]: r for r in runs}
    for ax, (what, g, d) in zip(axes, panels, strict=True):
        for r in (r for r in runs if r["kind"] == "scratch"):
            ax.plot(r["curve"][:, 0], r["curve"][:, 2], color="black", lw=1,
                    label="scratch" if r["seed"] == min(x["seed"] for x in runs) else None)
        keys = ([k for k in agg if k[0] == "stack" and k[1] == g] if what == "stack"
                else [k for k in agg if k[1:] == (g, d)])
        for i, (op, gg, dd) in enumerate(keys):
            for r in (r for r in runs if r["kind"] == "grown" and (r["op"], r["g"], r["d"]) ==
                      (op, gg, dd)):
                col, first = cmap(i % 10), r["seed"] == agg[(op, gg, dd)]["seeds"][0]
                src = by_name.get(f"small-g{gg}-d{dd}-seed{r['seed']}")
                if src is not None and len(src["curve"]):
                    ax.plot(src["curve"][:, 0], src["curve"][:, 2], color=col, lw=1, ls="--")
                ax.plot(r["curve"][:, 0], r["curve"][:, 2], color=col, lw=1.5,
                        label=f"{op} g={gg} d={dd:,}" if first else None)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("cumulative training FLOPs (small model's included)")
        ax.set_ylabel("eval loss (nats/token)")
        ax.set_title(f"G_stack, g = {g}" if what == "stack" else f"operators, g = {g}, d = {d:,}")
        ax.legend(fontsize=7)
    lp._save(fig, out_dir / "loss_vs_flops.png")


def main(argv: list[str] | None = None) -> int:
    """``--preset cpu|gpu --out DIR [--set K=V ...]``: train every run of :func:`plan` (skipping
    finished ones), then :func:`analyze`; exit 2 with one line on a :class:`ConfigError`."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="study directory (one subdirectory per run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field of every run (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no line per finished run")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        runs = plan(args.preset, parse_overrides(args.overrides))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        execute(runs, out, quiet=args.quiet)
    except ConfigError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    analyze(out)
    print(f"measured: {len(runs)} runs + analysis in {time.perf_counter() - t0:.0f} s wall "
          f"(this invocation; finished runs are skipped)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
