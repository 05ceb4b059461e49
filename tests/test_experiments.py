"""The experiment scripts' grids: the main job's IsoFLOP design rules (no training here)."""

import math
from pathlib import Path

import numpy as np
import pytest

import jscale
from jscale import sweep
from jscale.cli.script import load_script

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def isoflop():
    return load_script(EXPERIMENTS / "isoflop.py")


@pytest.fixture(scope="module")
def cpu_grid(isoflop):
    return isoflop.grid("cpu")


def test_cpu_grid_has_one_architecture_rule(isoflop, cpu_grid):
    assert cpu_grid and not any(isinstance(r, sweep.InvalidRun) for r in cpu_grid)
    p = isoflop.PRESETS["cpu"]
    for r in cpu_grid:
        m = r.model
        assert m.n_kv_heads == m.n_heads  # MHA at every size: no mix of MHA and GQA
        assert m.k == p["head_dim"] and m.d_ff == 3 * m.d_model and m.n_layers >= 2
        assert r.train.seed == 0 and r.optim.schedule == "cosine"
        n = jscale.count_params(m)["with_head"]
        assert r.optim.lr == pytest.approx(isoflop.lr_for(n, p))
        assert 1 <= r.optim.warmup_steps <= max(1, r.train.steps // 10)
        assert r.train.eval_batches * r.train.batch_size * r.train.seq_len >= 65_536


def test_cpu_grid_centres_every_budget_on_its_valley(isoflop, cpu_grid):
    p = isoflop.PRESETS["cpu"]
    corpus = jscale.data.load_corpus(cpu_grid[0].data, 257, cpu_grid[0].train.seq_len)
    for budget in p["budgets"]:
        members = [r for r in cpu_grid if r.train.flops_budget == budget]
        n = sorted(jscale.count_params(r.model)["with_head"] for r in members)
        assert len(set(n)) == len(n) >= p["n_sizes"]
        n_star = math.sqrt(budget / (6 * p["tokens_per_param"]))
        assert n[0] < n_star < n[-1] and n[-1] / n[0] > 4
        for r in members:
            tokens = r.train.steps * r.train.batch_size * r.train.seq_len
            assert jscale.data.epochs(corpus, tokens) < 1  # no repeated data in the main job
    # the learning-rate rule decreases with size
    lrs = sorted((jscale.count_params(r.model)["with_head"], r.optim.lr) for r in cpu_grid)
    assert all(a[1] >= b[1] for a, b in zip(lrs, lrs[1:], strict=False))


def test_accelerator_presets_require_a_corpus(isoflop):
    for preset in ("gpu", "tpu"):
        with pytest.raises(jscale.ConfigError, match="data.path"):
            isoflop.grid(preset)
    runs = isoflop.grid("gpu", {"data.path": "corpus.jsonl", "data.tokenizer": "bpe",
                                "model.vocab_size": "32768"})
    assert all(r.data.path == "corpus.jsonl" and r.model.vocab_size == 32768 for r in runs)
    assert all(r.model.n_kv_heads == r.model.n_heads and r.model.k == 64 for r in runs)


def test_lr_rule_pilot_brackets_the_rule():
    lr_rule = load_script(EXPERIMENTS / "lr_rule.py")
    runs = lr_rule.grid("cpu")
    by_size: dict[int, list[float]] = {}
    for r in runs:
        by_size.setdefault(jscale.count_params(r.model)["with_head"], []).append(r.optim.lr)
    iso = load_script(EXPERIMENTS / "isoflop.py")
    for n, lrs in by_size.items():
        rule = iso.lr_for(n, iso.PRESETS["cpu"])
        assert min(lrs) < rule < max(lrs) and len(lrs) == 5
    assert len(by_size) == 4 and {r.train.flops_budget for r in runs} == {3e11}
    assert np.ptp(list(by_size)) > 0


def _isoflop_table(budgets=(1e15, 3e15, 1e16), n_sizes=5, seed=0):
    """A results frame of an IsoFLOP grid (as jscale.sweep.load returns it) for a known law."""
    import pandas as pd

    from jscale import laws
    true = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    g = (true["alpha"] * true["A"] / (true["beta"] * true["B"])) ** (1 / (true["alpha"] + true["beta"]))
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        n_opt = g * (C / 6) ** (true["beta"] / (true["alpha"] + true["beta"]))
        for i, n in enumerate(n_opt * np.geomspace(0.25, 4.0, n_sizes)):
            n = float(round(n))
            fpt = 6.0 * n + 6.0 * 64 * 257
            d = C / fpt
            loss = float(laws.chinchilla(true, n, d) * math.exp(rng.normal(0, 0.01)))
            rows.append(dict(run_id=f"{C:.3g}-{i}", status="ok", error=None, n_params=n + 2 * 257 * 64,
                             n_params_non_embedding=n, tokens=d, flops=fpt * d, flops_per_token=fpt,
                             budget=float(C), final_eval_loss=loss, final_train_loss=loss * 0.98,
                             diverged=False, **{"model.vocab_size": 257, "model.d_model": 64}))
    rows.append(dict(run_id="failed", status="failed", error="config: impossible"))
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_isoflop_analyze_fits_each_law_once(isoflop, tmp_path, monkeypatch, capsys):
    """The main job's analysis: Approach 2 and Approach 3 (and their bootstraps) are each fitted once
    on the runs; the next-budget allocation reuses the report's fit and bootstrap samples."""
    from jscale.laws import fitting, uncertainty
    from jscale.laws import isoflop as approach2

    calls = []

    def counting(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(name if name != "fit" else
                         (name, args[0].name, tuple(np.asarray(v).tobytes() for v in
                                                    dict(args[1]).values())))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    counting(fitting, "fit")
    counting(uncertainty, "fit")
    counting(approach2, "fit_isoflop")
    counting(approach2, "bootstrap_isoflop")
    counting(uncertainty, "bootstrap")
    isoflop.analyze(_isoflop_table(), tmp_path)
    out = capsys.readouterr().out
    fits = [c for c in calls if isinstance(c, tuple)]
    assert len(fits) == len(set(fits)) == 3    # Approach 3, extrapolation (fewer runs), Kaplan's N
    assert calls.count("fit_isoflop") == calls.count("bootstrap_isoflop") == 1
    assert calls.count("bootstrap") == 1
    assert "== Next budget up, C = 3.33e+16" in out and "Approach 2 not possible" not in out
    summary = (tmp_path / "summary.json").read_text()
    assert '"approach2": {' in summary and '"next_budget"' in summary


@pytest.fixture(scope="module")
def moe_leverage():
    return load_script(EXPERIMENTS / "moe_leverage.py")


def test_moe_leverage_grids_have_dense_and_moe_members(moe_leverage):
    gpu_set = {"data.path": "corpus.jsonl", "data.tokenizer": "bpe", "model.vocab_size": "32768"}
    with pytest.raises(jscale.ConfigError, match="data.path"):
        moe_leverage.grid("gpu")
    with pytest.raises(jscale.ConfigError, match="model.moe.impl"):  # would make dense runs MoE
        moe_leverage.grid("cpu", {"model.moe.impl": "pallas"})
    for preset, overrides in (("cpu", None), ("gpu", gpu_set)):
        p = moe_leverage.PRESETS[preset]
        runs = moe_leverage.grid(preset, overrides)
        assert runs and not any(isinstance(r, sweep.InvalidRun) for r in runs)
        assert len({sweep.run_id(r) for r in runs}) == len(runs)
        configs = {None if r.model.moe is None else
                   (r.model.moe.n_experts, r.model.moe.top_k,
                    2 * r.model.d_model / r.model.moe.d_expert) for r in runs}
        assert configs == {None, *((e, k, float(g)) for e, k, g in p["moe"])}
        for r in runs:
            assert {r.train.flops_budget} <= set(p["budgets"])
            fpt = jscale.flops_per_token(r.model, r.train.seq_len)["training"]
            spent = fpt * r.train.steps * r.train.batch_size * r.train.seq_len
            assert spent == pytest.approx(r.train.flops_budget, rel=0.05)  # sweep.grid.ISOFLOP_RTOL
            n = moe_leverage.active_with_head(r.model)
            assert r.optim.lr == pytest.approx(moe_leverage.lr_for(n, p))
            if r.model.moe is not None:
                assert r.model.moe.n_shared_experts == 0 and r.model.moe.every == 1
                assert n < jscale.count_params(r.model)["with_head"] or r.model.moe.top_k == \
                    r.model.moe.n_experts
        # every configuration's sizes bracket each budget's N* in active parameters
        for cfg in configs:
            for budget in p["budgets"]:
                n = [moe_leverage.active_with_head(r.model) for r in runs
                     if r.train.flops_budget == budget and
                     (r.model.moe is None if cfg is None else
                      r.model.moe is not None and r.model.moe.n_experts == cfg[0] and
                      r.model.moe.top_k == cfg[1] and
                      2 * r.model.d_model / r.model.moe.d_expert == cfg[2])]
                n_star = math.sqrt(budget / (6 * p["tokens_per_param"]))
                assert len(n) >= 3 and min(n) < n_star < max(n)


def _moe_table(el=None, alpha=0.1, budgets=(1e15, 3e15, 1e16, 3e16), n_sizes=3, seed=0):
    """Sweep-shaped rows: per configuration and budget, ``n_sizes`` runs whose best loss lies on
    ``L = 5 · (EL · C / 1e15)^−α`` (the MoE at C matches the dense model at EL·C)."""
    import pandas as pd
    el = el or {None: 1.0, (8, 1, 64): 2.0, (8, 2, 128): 4.0}
    rng = np.random.default_rng(seed)
    rows = []
    for cfg, lev in el.items():
        for C in budgets:
            best = 5.0 * (lev * C / 1e15) ** -alpha
            for i in range(n_sizes):
                loss = best * (1 + 0.02 * i) * math.exp(rng.normal(0, 0.002))
                row = {"run_id": f"{cfg}-{C:.3g}-{i}", "status": "ok", "error": None,
                       "final_eval_loss": loss, "diverged": False, "budget": C,
                       "flops": C * (1 + 0.002 * rng.normal()), "n_params": 3e6 + i,
                       "n_params_with_head": 2e6 + i, "n_params_active": 1e6 + i,
                       "model.d_model": 64, "model.moe.n_experts": None,
                       "model.moe.top_k": None, "model.moe.d_expert": None}
                if cfg is not None:
                    row.update({"model.moe.n_experts": cfg[0], "model.moe.top_k": cfg[1],
                                "model.moe.d_expert": cfg[2]})
                rows.append(row)
    rows.append({"run_id": "failed", "status": "failed", "error": "config: impossible"})
    return pd.DataFrame(rows)


def test_moe_leverage_analyze_recovers_known_leverage(moe_leverage, tmp_path, capsys):
    from tolerances import MOE_LEVERAGE_RTOL
    summary = moe_leverage.analyze(_moe_table(), tmp_path, n_boot=20)
    out = capsys.readouterr().out
    assert "ACTIVE parameters" in out and "EL" in out
    by = {c["label"]: c for c in summary["configs"]}
    assert by["dense"]["alpha"] == pytest.approx(0.1, rel=0.1)
    moe1, moe2 = by["MoE E=8 k=1 G=2 (A=1/8)"], by["MoE E=8 k=2 G=1 (A=2/8)"]
    assert moe1["EL"] == pytest.approx(2.0, rel=MOE_LEVERAGE_RTOL)
    assert moe2["EL"] == pytest.approx(4.0, rel=MOE_LEVERAGE_RTOL)
    for c in (moe1, moe2):
        lo, hi = c["EL_interval"]
        assert lo <= c["EL"] <= hi and c["EL_points"] == pytest.approx(c["EL"], rel=0.1)
    for name in ("loss_vs_compute.png", "el_vs_activation_ratio.png", "summary.txt",
                 "summary.json"):
        assert (tmp_path / name).stat().st_size > 0


# --- experiments/parscale_law.py ----------------------------------------------------------------

@pytest.fixture(scope="module")
def parscale_law():
    return load_script(EXPERIMENTS / "parscale_law.py")


def test_parscale_law_grid_is_sizes_by_streams_on_equal_tokens(parscale_law):
    runs = parscale_law.grid("cpu")
    p = parscale_law.PRESETS["cpu"]
    assert len(runs) == len(p["sizes"]) * len(parscale_law.STREAMS)
    assert {r.model.n_streams for r in runs} == set(parscale_law.STREAMS)
    assert len({r.train.steps * r.train.batch_size * r.train.seq_len for r in runs}) == 1
    for r in runs:  # one learning rate per size, whatever P
        same = [q for q in runs if q.model.d_model == r.model.d_model]
        assert {q.optim.lr for q in same} == {r.optim.lr}
    with pytest.raises(jscale.ConfigError, match="data.path"):
        parscale_law.grid("gpu")
    with pytest.raises(jscale.ConfigError, match="model.n_streams"):
        parscale_law.grid("cpu", {"model.n_streams": 2})


LAW = {"k": 0.4, "alpha": 0.3, "E": 1.5, "A": 1e4}


def _parscale_table(parscale_law):
    """Sweep-shaped rows of the cpu grid whose final losses lie exactly on the ParScale law."""
    import pandas as pd
    rows = []
    for r in parscale_law.grid("cpu"):
        n = jscale.count_params(r.model)["non_embedding"]
        P = r.model.n_streams
        loss = (LAW["A"] / (n * (LAW["k"] * math.log(P) + 1))) ** LAW["alpha"] + LAW["E"]
        rows.append({**r.flat(), "status": "ok", "final_eval_loss": loss, "diverged": False,
                     "n_params_non_embedding": n, "tokens": 153_600, "epochs": 0.6})
    return pd.DataFrame(rows)


def test_parscale_law_analyze_recovers_the_law_and_prices_inference(parscale_law, tmp_path,
                                                                     monkeypatch, capsys):
    from tolerances import PARSCALE_PARAM_RTOL

    def fake_measure(cfg, *, prompt_tokens, decode_tokens):  # cost ∝ parameters + P · layers
        n = jscale.count_params(cfg)["total"]
        return {"latency_s": 1e-6 * n + 1e-4 * cfg.n_layers * getattr(cfg, "n_streams", 1),
                "param_bytes": 4 * n, "cache_bytes": 1000, "memory_bytes": 4 * n + 1000}
    monkeypatch.setattr(parscale_law, "measure_decode", fake_measure)
    summary = parscale_law.analyze(_parscale_table(parscale_law), tmp_path, n_boot=8)
    out = capsys.readouterr().out
    assert "N = non-embedding parameters incl. prefixes" in out and "k ln P + 1" in out
    for name, want in LAW.items():
        assert summary["fit"]["params"][name] == pytest.approx(want, rel=PARSCALE_PARAM_RTOL)
    assert summary["parameter_multiplier"]["8"]["multiplier"] == pytest.approx(
        LAW["k"] * math.log(8) + 1, rel=PARSCALE_PARAM_RTOL)
    assert summary["holdout_p8"]["max_abs_rel_error"] < 1e-3  # exact data: P ≤ 4 predicts P = 8
    assert summary["trusted"] and "CAUTION" not in out
    cost = summary["inference"]
    assert len(cost) == 16
    for c in cost:  # the dense equivalent has about N·(k ln P + 1) parameters
        if c["P"] > 1:
            m = LAW["k"] * math.log(c["P"]) + 1
            assert 0.5 < c["dense_N"] / (c["N"] * m) < 2.0
    for name in ("loss_vs_n.png", "fit_vs_observed.png", "inference_cost.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_jscale_fit_parscale_reads_the_streams_from_sweep_rows(parscale_law, tmp_path):
    """Sweep rows carry ``model.n_streams`` (the CLI's default ``--streams`` column), so ``jscale
    fit --law parscale`` fits a ParScale sweep as it is."""
    from tolerances import PARSCALE_PARAM_RTOL

    from jscale.cli.fit import STREAMS_COLUMN
    from jscale.laws import report
    df = _parscale_table(parscale_law)
    assert STREAMS_COLUMN in df
    rep = report.analyze(df, tmp_path, law="parscale", streams=STREAMS_COLUMN, bootstrap=0,
                         echo=lambda line: None)
    for name, want in LAW.items():
        assert rep.fit.params[name] == pytest.approx(want, rel=PARSCALE_PARAM_RTOL)
