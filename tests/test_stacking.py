"""experiments/stacking.py, the growth study: its plan (equal total FLOPs for every grown run and the
scratch run, the layer counts, the gpu preset's corpus requirement), its analysis on hand-written run
directories with known curves (a known speed-up, the lower-bound case), and one micro end-to-end run
through the real train/grow path."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from tolerances import F64_IDENTITY_RTOL

import jscale

PATH = Path(__file__).resolve().parents[1] / "experiments" / "stacking.py"


@pytest.fixture(scope="module")
def stacking():
    spec = importlib.util.spec_from_file_location("jscale_experiment_stacking", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the class is made
    spec.loader.exec_module(module)
    return module


def _flops(stacking, run) -> float:
    tc = run.cfg.train
    return stacking.training_fpt(run.cfg) * tc.steps * tc.batch_size * tc.seq_len


@pytest.mark.parametrize("preset,overrides", [("cpu", {}), ("gpu", {"data.path": "corpus.jsonl"})])
def test_plan_spends_the_scratch_budget_on_every_grown_run(stacking, preset, overrides):
    runs = stacking.plan(preset, overrides)
    p = stacking.PRESETS[preset]
    by_name = {r.name: r for r in runs}
    assert len(by_name) == len(runs)  # one directory per run
    order = {r.name: i for i, r in enumerate(runs)}
    scratch = {r.seed: r for r in runs if r.kind == "scratch"}
    assert sorted(scratch) == sorted(p["seeds"])
    grown = [r for r in runs if r.kind == "grown"]
    n_settings = len(p["factors"]) * len(p["fractions"]) + len(p["operators"])
    assert len(grown) == n_settings * len(p["seeds"])
    for r in grown:
        ref, small = scratch[r.seed], by_name[r.source]
        assert order[r.source] < order[r.name]  # the small model trains first
        step = stacking.training_fpt(ref.cfg) * ref.cfg.train.batch_size * ref.cfg.train.seq_len
        learn = (r.cfg.growth.learn_steps or 0) * step  # G_learn's LiGO steps count
        assert (r.op == "learn") == (learn > 0)
        assert abs(_flops(stacking, small) + learn + _flops(stacking, r)
                   - _flops(stacking, ref)) <= step / 2
        assert r.cfg.model.n_layers == ref.cfg.model.n_layers == p["n_layers"]
        assert r.cfg.source_config() == small.cfg  # the growth section describes the small run
        if r.op == "direct_width":  # 1/g the width, the full depth
            assert small.cfg.model.n_layers == p["n_layers"]
            assert small.cfg.model.d_model * r.g == r.cfg.model.d_model
        else:
            assert small.cfg.model.n_layers * r.g == p["n_layers"]
            assert small.cfg.model.d_model == r.cfg.model.d_model
        assert (r.cfg.growth.grow_steps > 0) == (r.op == "random")
        assert r.d == small.cfg.train.steps * small.cfg.train.batch_size * small.cfg.train.seq_len
        assert small.cfg.train.seed == r.seed and r.cfg.train.seed == stacking.GROWN_SEED_OFFSET + r.seed
        assert small.cfg.optim.lr == ref.cfg.optim.lr  # same optimizer
    # the operator comparison shares its small model (hence g and d) with a G_stack setting
    others = [r for r in grown if r.op != "stack"]
    assert {r.op for r in others} == set(p["operators"])
    for r in others:
        assert r.g == p["op_setting"][0]
        if r.op != "direct_width":
            assert any(s.op == "stack" and s.source == r.source for s in grown)


def test_gpu_preset_refuses_without_a_corpus(stacking):
    with pytest.raises(jscale.ConfigError, match="data.path"):
        stacking.plan("gpu")
    with pytest.raises(jscale.ConfigError, match="train.steps"):
        stacking.plan("cpu", {"train.steps": "10"})
    assert stacking.main(["--preset", "gpu", "--out", "/nonexistent/never"]) == 2


# --- the analysis on hand-written runs ------------------------------------------------------------

FPT = 1e6  # FLOPs per token of every synthetic run (so tokens = C / FPT)
A, B, C0 = 5.0, 0.2, 1e9  # scratch curve: loss = A − B·ln(C / C0), exact in log C
K = 0.1  # a grown run's curve falls K·ln(C_total / C) onto its final loss


def _curve_loss(c: float) -> float:
    return A - B * math.log(c / C0)


def _write(run_dir: Path, *, loss: float, tokens: list[int], losses: list[float],
           lineage: dict | None = None) -> None:
    run_dir.mkdir(parents=True)
    s = {"final_eval_loss": loss, "flops_per_token": FPT, "tokens": tokens[-1],
         "flops": FPT * tokens[-1], "n_params": 200_000}
    if lineage is not None:
        (run_dir / "lineage.json").write_text(json.dumps(lineage))
        s.update(lineage, total_tokens=s["tokens"] + lineage["source_tokens"],
                 total_flops=s["flops"] + lineage["source_flops"])
    (run_dir / "summary.json").write_text(json.dumps(s))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "tokens": t, "loss": v + 0.1, "eval_loss": v}) + "\n"
        for i, (t, v) in enumerate(zip(tokens, losses, strict=True))))


def _scratch(out: Path, seed: int) -> None:
    tokens = [int(t) for t in np.geomspace(1e3, 1e5, 21)]  # C from 1e9 to 1e11
    _write(out / f"scratch-seed{seed}", loss=_curve_loss(FPT * tokens[-1]), tokens=tokens,
           losses=[_curve_loss(FPT * t) for t in tokens])


def _grown(out: Path, op: str, g: int, d: int, seed: int, *, total: float, final: float) -> None:
    """A grown run of total FLOPs ``total`` (its small model: ``d`` tokens) ending at ``final``."""
    if not (out / f"small-g{g}-d{d}-seed{seed}").exists():  # operators at one setting share it
        _write(out / f"small-g{g}-d{d}-seed{seed}", loss=6.0, tokens=[d // 2, d], losses=[6.5, 6.0])
    src = FPT * d
    own = int(round((total - src) / FPT))
    tokens = [own // 2, own]  # the grown run's own curve: final + K·ln(total / C)
    _write(out / f"grown-{op}-g{g}-d{d}-seed{seed}", loss=final, tokens=tokens,
           losses=[final + K * math.log(total / (src + FPT * t)) for t in tokens],
           lineage={"source_run": "x", "source_step": 1, "growth_op": f"{op}:{g}",
                    "source_tokens": d, "source_flops": src})


def test_analyze_recovers_a_known_speedup_and_reports_the_lower_bound(stacking, tmp_path):
    total = 4e10
    for seed, speedup in ((0, 0.4), (1, 0.6)):
        _scratch(tmp_path, seed)
        # the scratch run reaches the grown run's final loss at (1 + speedup)·total
        _grown(tmp_path, "stack", 2, 1000, seed, total=total,
               final=_curve_loss((1 + speedup) * total))
        # below anything the scratch run reached: only a lower bound
        _grown(tmp_path, "zero", 2, 1000, seed, total=total, final=_curve_loss(1e11) - 0.05)
    summary = stacking.analyze(tmp_path)
    by_key = {(s["op"], s["g"], s["d"]): s for s in summary["settings"]}
    stack = by_key[("stack", 2, 1000)]
    assert stack["speedup"]["mean_flag"] == ""
    for key, want in (("mean", 0.5), ("min", 0.4), ("max", 0.6)):
        assert stack["speedup"][key] == pytest.approx(want, rel=F64_IDENTITY_RTOL)
        # tokens: the scratch run's tokens at that loss over the grown run's total tokens
        assert stack["token_speedup"][key] == pytest.approx(want, rel=F64_IDENTITY_RTOL)
    for e in stack["per_seed"]:
        assert e["loss_gap"] == pytest.approx(_curve_loss(total) - e["loss"], abs=F64_IDENTITY_RTOL)
    zero = by_key[("zero", 2, 1000)]
    assert zero["speedup"]["mean_flag"] == ">" and zero["speedup"]["min_flag"] == ">"
    assert zero["speedup"]["mean"] == pytest.approx((1e11 - total) / total, rel=F64_IDENTITY_RTOL)
    # the paper's Fig. 1 reading: the grown run's own curve reaches the scratch's final loss (0.05
    # above its own final) at C_total·exp(−0.05 / K); the stack runs never reach it (upper bound)
    assert zero["paper_speedup"]["mean_flag"] == ""
    assert zero["paper_speedup"]["mean"] == pytest.approx(1e11 / (total * math.exp(-0.05 / K)) - 1,
                                                          rel=F64_IDENTITY_RTOL)
    assert stack["paper_speedup"]["mean_flag"] == "<"
    text = (tmp_path / "summary.txt").read_text()
    assert ">+1.500" in text and "<+1.500" in text  # (1e11 − 4e10) / 4e10, marked as bounds
    assert summary["not_built"] == []  # every operator of the paper is built
    assert "guideline" in text and summary["best_d"]["2"]["d"] == 1000
    assert (tmp_path / "loss_vs_flops.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "summary.json").read_text())["conventions"] == stacking.CONVENTIONS


def test_crossing_flags_both_bounds(stacking):
    curve = np.array([[1e9, 1e3, 3.0], [1e10, 1e4, 2.0], [1e11, 1e5, 1.0]])
    c, t, flag = stacking.crossing(curve, 1.5)
    assert flag == "" and c == pytest.approx(math.sqrt(1e10 * 1e11), rel=F64_IDENTITY_RTOL)
    assert stacking.crossing(curve, 0.5)[2] == ">" and stacking.crossing(curve, 0.5)[0] == 1e11
    assert stacking.crossing(curve, 3.5)[2] == "<"


# --- end to end -------------------------------------------------------------------------------------

MICRO = dict(d_model=32, n_layers=2, head_dim=16, seq_len=16, batch_size=2, steps=8, lr=1e-2,
             warmup=1, eval_every=4, eval_batches=1, factors=(2,), fractions=(0.25,), seeds=(0,),
             operators=("random", "learn", "direct_width"), op_setting=(2, 0.25),
             checkpoint_every=0, grow_fraction=0.25, learn_steps=2)


@pytest.mark.slow
def test_micro_study_end_to_end(stacking, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(stacking.PRESETS, "micro", MICRO)
    assert stacking.main(["--preset", "micro", "--out", str(tmp_path), "--quiet"]) == 0
    scratch = json.loads((tmp_path / "scratch-seed0" / "summary.json").read_text())
    grown_dir = tmp_path / "grown-stack-g2-d64-seed0"
    grown = json.loads((grown_dir / "summary.json").read_text())
    assert json.loads((grown_dir / "lineage.json").read_text())["growth_op"] == "stack:2"
    assert grown["source_flops"] > 0
    assert abs(grown["total_flops"] - scratch["flops"]) <= scratch["flops"] / MICRO["steps"] / 2
    for op in ("random", "learn", "direct_width"):
        other = json.loads((tmp_path / f"grown-{op}-g2-d64-seed0" / "summary.json").read_text())
        assert other["growth_op"] == (op if op == "direct_width" else f"{op}:2")
        assert abs(other["total_flops"] - scratch["flops"]) <= scratch["flops"] / MICRO["steps"] / 2
    out = capsys.readouterr().out
    assert "stack" in out and "best d" in out and "conventions" in out and "direct_width" in out
    mtime = (grown_dir / "summary.json").stat().st_mtime_ns
    assert stacking.main(["--preset", "micro", "--out", str(tmp_path), "--quiet"]) == 0  # resumes
    assert (grown_dir / "summary.json").stat().st_mtime_ns == mtime
