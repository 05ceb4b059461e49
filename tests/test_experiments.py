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
