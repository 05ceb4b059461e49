"""Sweeps: grids, grouping, vmap ≡ sequential, one compile per group, divergence isolation, the
results store, failures, the runs mesh axis, and kill-and-resume equality."""

import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import (
    STATE_LEAF,
    STATE_METRIC,
    env,
    metrics_rows,
    micro_cfg,
    patch_stateful_forward,
    xla_flags,
)
from tolerances import F32_REORDER, SWEEP_VMAP_VS_SEQUENTIAL

import jscale
from jscale import core, sweep, train
from jscale.config import ConfigError, parse_overrides
from jscale.sweep import group as group_lib
from jscale.sweep import strategy as strategy_lib

MICRO = ["model.d_model=32", "model.n_layers=1", "model.d_ff=64", "model.n_heads=2",
         "model.n_kv_heads=1", "train.seq_len=32", "train.batch_size=4", "train.steps=12",
         "train.log_every=4", "train.eval_every=6", "train.eval_batches=1", "optim.warmup_steps=2"]
BASE = micro_cfg(MICRO)
TIMING = {"wall_time_s", "group_wall_time_s"}


def _group_a(lr_of_last=3e-3):
    """4 runs of one shape differing in lr, seed, schedule length and init scale."""
    return sweep.zip_(BASE, **{"optim.lr": [1e-3, 3e-3, 1e-3, lr_of_last],
                               "train.seed": [0, 0, 1, 1], "train.steps": [12, 12, 8, 12],
                               "model.init_scale": [1.0, 1.0, 0.5, 1.0]})


GROUP_B = sweep.product(BASE, **{"model.d_model": [48], "model.n_heads": [3]})


@pytest.fixture(scope="module")
def traced(monkeypatch_module):
    """Count traces of the train step (each one is a compilation)."""
    calls = []
    original = core.train_step

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch_module.setattr(core, "train_step", counting)
    return calls


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def vmap_df(tmp_path_factory, traced):
    out = tmp_path_factory.mktemp("vmap")
    before = len(traced)
    df = sweep.run(_group_a() + GROUP_B, out, strategy="vmap", progress=False)
    df.attrs["compiles"] = len(traced) - before
    df.attrs["out"] = out
    return df


@pytest.fixture(scope="module")
def sequential_df(tmp_path_factory):
    return sweep.run(_group_a() + GROUP_B, tmp_path_factory.mktemp("seq"), strategy="sequential",
                     progress=False)


def _comparable(df):
    return df.drop(columns=[c for c in df.columns if c in TIMING]).to_dict("records")


def test_product_and_zip_sizes_and_stable_ids():
    runs = sweep.product(BASE, **{"model.d_model": [32, 64], "optim.lr": [1e-3, 3e-3],
                                  "train.seed": [0, 1]})
    assert len(runs) == 8 and len({sweep.run_id(r) for r in runs}) == 8
    assert runs[1].train.seed == 1 and runs[2].optim.lr == 3e-3  # last axis fastest
    again = sweep.product(BASE, **{"train.seed": [0, 1], "optim.lr": [1e-3, 3e-3],
                                   "model.d_model": [32, 64]})
    assert {sweep.run_id(r) for r in runs} == {sweep.run_id(r) for r in again}
    assert sweep.run_id(runs[0]) == sweep.run_id(BASE.override({"optim.lr": 1e-3,
                                                                "train.seed": 0}))
    assert len(sweep.zip_(BASE, **{"optim.lr": [1, 2, 3], "train.seed": [4, 5, 6]})) == 3
    with pytest.raises(ConfigError, match="same length"):
        sweep.zip_(BASE, **{"optim.lr": [1, 2], "train.seed": [1]})
    with pytest.raises(ConfigError, match="unknown config key 'optim.rate'"):
        sweep.product(BASE, **{"optim.rate": [1]})
    bad = sweep.product(BASE, **{"model.n_heads": [2, 3]})
    assert isinstance(bad[1], sweep.InvalidRun) and "model.d_model" in bad[1].error


def test_shape_rule_hits_target():
    for target in (1e5, 1e6, 1e7):
        cfg = sweep.shape_for_params(target, BASE.model)
        n = jscale.count_params(cfg)["non_embedding"]
        assert abs(math.log(n / target)) < math.log(1.25), (target, n)
        assert cfg.d_model % cfg.k == 0 and cfg.n_heads % cfg.n_kv_heads == 0


def test_shape_rule_keeps_one_attention_layout_and_counts_the_head_when_asked():
    gqa3 = jscale.presets.get("tiny").override({"model.n_heads": 6, "model.n_kv_heads": 2,
                                                "model.d_model": 192}).model
    for target in (1.5e4, 6e4, 2.4e5, 1e6):  # every size keeps 3 query heads per kv head
        cfg = sweep.shape_for_params(target, gqa3)
        assert cfg.n_heads == 3 * cfg.n_kv_heads, (target, cfg)
    with_head = sweep.shape_for_params(5e4, BASE.model, count="with_head")
    n = jscale.count_params(with_head)
    assert n["with_head"] == n["non_embedding"] + 257 * with_head.d_model
    assert abs(math.log(n["with_head"] / 5e4)) < math.log(1.25)
    with pytest.raises(ConfigError, match="count must be"):
        sweep.shape_for_params(5e4, BASE.model, count="embedding")
    assert sweep.shape_for_params(2e4, BASE.model, head_dim=16, min_layers=2).n_layers >= 2


def test_isoflop_budgets_hit():
    base = BASE.override({"train.batch_size": 8, "train.seq_len": 64})
    budgets = [1e12, 1e13]
    runs = sweep.isoflop(base, budgets)
    for budget in budgets:
        members = [r for r in runs if r.train.flops_budget == budget]
        assert len(members) >= 4, "the valley needs several sizes"
        sizes = [jscale.count_params(r.model)["non_embedding"] for r in members]
        assert len(set(sizes)) == len(sizes) and max(sizes) / min(sizes) > 3
        for r in members:
            spent = jscale.flops_per_token(r.model, 64)["training"] * r.train.steps * 8 * 64
            assert abs(spent / budget - 1) <= sweep.grid.ISOFLOP_RTOL
    explicit = sweep.isoflop(base, [1e12], n_params=[2e4, 4e4])
    assert len(explicit) == 2


@pytest.mark.parametrize("cfg", [BASE.model, jscale.MambaConfig(d_model=16, n_layers=1, d_state=4)])
def test_init_scale_as_data_matches_config(cfg):
    key = jax.random.PRNGKey(3)
    scaled = jscale.models.scale_init(jscale.init(key, cfg), np.float32(0.5), cfg)
    direct = jscale.init(key, dataclasses.replace(cfg, init_scale=0.5))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_REORDER), scaled, direct)


@pytest.mark.slow
def test_one_compile_per_group(vmap_df):
    assert vmap_df["group_id"].nunique() == 2
    assert vmap_df.attrs["compiles"] == 2
    assert set(vmap_df["group_compiles"]) == {1}


@pytest.mark.slow
def test_vmap_equals_sequential(vmap_df, sequential_df):
    assert list(vmap_df["run_id"]) == list(sequential_df["run_id"])
    for col in ("final_train_loss", "final_eval_loss", "min_eval_loss"):
        np.testing.assert_allclose(vmap_df[col], sequential_df[col], **SWEEP_VMAP_VS_SEQUENTIAL)
    assert set(vmap_df["strategy"]) == {"vmap"} and set(sequential_df["strategy"]) == {"sequential"}


@pytest.mark.slow
def test_results_rows(vmap_df):
    out = vmap_df.attrs["out"]
    row = vmap_df.iloc[2]  # the member with 8 steps
    assert row["train.steps"] == 8 and row["tokens"] == 8 * 4 * 32
    curve = sweep.load_curve(out, row["run_id"])
    assert list(curve["step"]) == [4, 6, 8] and curve["eval_loss"].notna().sum() == 2
    assert row["final_eval_loss"] == curve["eval_loss"].iloc[-1]
    for col in ("run_id", "group_id", "optim.lr", "model.d_model", "n_params",
                "n_params_non_embedding", "flops_per_token", "tokens", "flops", "budget",
                "final_train_loss", "final_eval_loss", "min_eval_loss", "diverged", "wall_time_s",
                "strategy", "device_kind", "jax_version", "epochs", "eval_tokens",
                "n_params_with_head", "wall_time_is_share"):
        assert col in vmap_df.columns, col
    assert row["eval_tokens"] == 1 * 4 * 32 and 0 < row["epochs"] < 1e-3
    assert row["n_params_with_head"] == row["n_params_non_embedding"] + 257 * 32
    assert row["wall_time_is_share"]  # vmapped: the group's wall time divided among its members
    assert _comparable(sweep.load(out)) == _comparable(vmap_df)


@pytest.mark.slow
@pytest.mark.parametrize("bad_lr", [1e30, 30.0], ids=["nan", "finite"])
def test_divergence_isolated(vmap_df, tmp_path, bad_lr):
    # lr 1e30 turns the loss NaN; lr 30 keeps it finite but thousands of nats above ln V.
    df = sweep.run(_group_a(lr_of_last=bad_lr), tmp_path, strategy="vmap", progress=False)
    assert df["diverged"].tolist() == [False, False, False, True]
    assert df["diverged_step"].iloc[3] >= 1 and df["final_eval_loss"].isna().iloc[3]
    assert df["final_train_loss"].isna().iloc[3]
    for col in ("final_train_loss", "final_eval_loss", "min_eval_loss"):  # bitwise
        assert df[col].iloc[:3].tolist() == vmap_df[col].iloc[:3].tolist()


@pytest.mark.slow
def test_runs_beyond_max_epochs_fail_and_the_others_train(tmp_path):
    corpus = tmp_path / "small.txt"  # ~2,500 training tokens
    corpus.write_text("\n\n".join(f"document {i}: " + "scaling laws " * 12 for i in range(16)))
    base = BASE.override({"data.path": str(corpus), "data.max_epochs": 6.0})
    df = sweep.run(sweep.product(base, **{"train.steps": [12, 200]}), tmp_path / "out",
                   strategy="vmap", progress=False)
    assert df["status"].tolist() == ["ok", "failed"]
    assert df["epochs"].iloc[0] == pytest.approx(12 * 4 * 32 / 2526, rel=0.01)
    assert "data.max_epochs" in df["error"].iloc[1] and "10.1 epochs" in df["error"].iloc[1]


@pytest.mark.slow
def test_group_stops_when_every_member_has_diverged(tmp_path, monkeypatch):
    steps = []
    original = group_lib._due

    def counting(cfg, step):
        steps.append(step)
        return original(cfg, step)
    monkeypatch.setattr(group_lib, "_due", counting)
    runs = sweep.product(BASE, **{"optim.lr": [30.0, 60.0]})
    df = sweep.run(runs, tmp_path, strategy="vmap", progress=False)
    assert df["diverged"].all() and max(steps) == 4  # the first row (step 4), not all 12 steps


@pytest.mark.slow
def test_failed_runs_are_reported_and_the_sweep_goes_on(tmp_path):
    bad_data = BASE.override({"data.path": str(tmp_path / "missing.txt"), "model.d_model": 40,
                              "model.n_heads": 2})
    runs = sweep.product(BASE, **{"model.n_heads": [3]}) + [bad_data] + GROUP_B
    df = sweep.run(runs, tmp_path / "out", strategy="vmap", progress=False)
    assert df["status"].tolist() == ["failed", "failed", "ok"]
    assert "model.d_model" in df["error"].iloc[0] and "data.path" in df["error"].iloc[1]
    assert np.isfinite(df["final_eval_loss"].iloc[2])


@pytest.mark.slow
def test_max_group_size_splits(vmap_df, tmp_path):
    df = sweep.run(_group_a(), tmp_path, strategy="vmap", max_group_size=2, progress=False)
    assert df["group_size"].tolist() == [2, 2, 2, 2]
    np.testing.assert_allclose(df["final_eval_loss"], vmap_df["final_eval_loss"].iloc[:4],
                               **SWEEP_VMAP_VS_SEQUENTIAL)


@pytest.mark.slow
def test_runs_axis_sharded_over_devices(vmap_df, tmp_path):
    """A group on mesh runs=4 × data=2: members over `runs`, each member's batch over `data`;
    the results equal the unsharded group's."""
    assert jax.device_count() == 8
    runs = [r.override({"mesh.runs": 4, "mesh.data": 2}) for r in _group_a()]
    layout = group_lib.make_layout(runs[0])
    progs = group_lib.build_programs(group_lib.signature(runs[0]), "vmap", layout)
    state, _ = progs.init(group_lib._member_data(runs))
    leaf = state.params["layers"]["attn"]["w_q_LDHK"]
    assert leaf.sharding.spec == jax.sharding.PartitionSpec("runs")
    assert len(leaf.sharding.device_set) == 8 and leaf.addressable_shards[0].data.shape[0] == 1
    df = sweep.run(runs[:3], tmp_path, strategy="auto", progress=False)  # padded to 4 members
    assert set(df["strategy"]) == {"vmap"}
    for col in ("final_eval_loss", "final_train_loss"):
        np.testing.assert_allclose(df[col], vmap_df[col].iloc[:3], **SWEEP_VMAP_VS_SEQUENTIAL)
    with pytest.raises(ConfigError, match="'sequential' trains one member at a time"):
        group_lib.build_programs(group_lib.signature(runs[0]), "sequential", layout)


@pytest.mark.slow
def test_auto_probes_once_and_records_its_choice(tmp_path):
    runs = sweep.product(BASE, **{"model.d_model": [48], "model.n_heads": [3], "train.seed": [0, 1]})
    df = sweep.run(runs, tmp_path, strategy="auto", progress=False)
    choices = json.loads((tmp_path / "strategies.json").read_text())
    (probe,) = choices.values()
    assert set(df["strategy"]) == {probe["choice"]} <= {"vmap", "sequential"}
    assert probe["vmap_s_per_step"] > 0 and probe["sequential_s_per_step"] > 0
    assert df["group_compiles"].iloc[0] == 1  # the probe's compiled program is the one trained with
    single = sweep.run(GROUP_B, tmp_path / "single", strategy="auto", progress=False)
    assert single["strategy"].iloc[0] == "sequential"  # one run: nothing to pack, no probe


SCRIPT = """
import sys
import jscale
import jscale.cli
from jscale import sweep
from jscale.config import parse_overrides

MICRO = {micro!r}

def grid(preset):
    base = jscale.presets.get("tiny").override(parse_overrides(MICRO))
    return (sweep.zip_(base, **{{"optim.lr": [1e-3, 3e-3], "train.seed": [0, 1]}})
            + sweep.product(base, **{{"model.d_model": [48], "model.n_heads": [3]}}))

if __name__ == "__main__":
    if "--slow-second-group" in sys.argv:
        sys.argv.remove("--slow-second-group")
        import time
        from jscale.sweep import group
        run_group, calls = group.run_group, []
        def slow(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                time.sleep(30)  # the test kills the sweep here, after the first group committed
            return run_group(*args, **kwargs)
        group.run_group = slow
    jscale.cli.experiment(grid)
"""


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    script = tmp_path / "exp.py"
    script.write_text(SCRIPT.format(micro=MICRO))
    def cmd(out, *extra):
        return [sys.executable, str(script), "--preset", "cpu", "--out", str(out),
                "--strategy", "vmap", "--quiet", *extra]

    subprocess.run(cmd(tmp_path / "full"), env=env(), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed, "--slow-second-group"), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = killed / "results.jsonl"
    while proc.poll() is None and not (results.exists() and results.read_text().count("\n") >= 2):
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(sweep.load(killed)) == 2  # the first group committed, the second not
    # The same line via `jscale sweep` resumes and completes it.
    subprocess.run([sys.executable, "-m", "jscale.cli", "sweep", *cmd(killed)[1:]], env=env(),
                   check=True, capture_output=True, timeout=600)
    full, resumed = sweep.load(tmp_path / "full"), sweep.load(killed)
    assert len(resumed) == 3 and resumed["run_id"].is_unique
    key = "run_id"
    assert (_comparable(full.sort_values(key).reset_index(drop=True)) ==
            _comparable(resumed.sort_values(key).reset_index(drop=True)))


@pytest.mark.slow
def test_mamba_runs_in_a_sweep(tmp_path):
    base = jscale.presets.get("mamba-tiny").override(parse_overrides(
        ["model.d_model=16", "model.n_layers=1", "model.d_state=4", "train.seq_len=32",
         "train.batch_size=4", "train.steps=6", "train.log_every=3", "train.eval_every=0",
         "train.eval_batches=1"]))
    runs = sweep.product(base, **{"train.seed": [0, 1], "model.init_scale": [1.0, 0.5]})
    df = sweep.run(runs, tmp_path, strategy="vmap", progress=False)
    assert df["group_id"].nunique() == 1 and set(df["status"]) == {"ok"}
    assert np.all(np.isfinite(df["final_eval_loss"])) and df["final_eval_loss"].nunique() == 4


MESH_SCRIPT = """
import json
import jscale.cli
from jscale.config import RunConfig

def grid(preset):
    return [RunConfig.from_dict(d) for d in json.loads(open({runs!r}).read())]

if __name__ == "__main__":
    jscale.cli.experiment(grid)
"""


@pytest.mark.slow
def test_two_process_sweep_equals_unsharded(vmap_df, tmp_path, free_port):
    """`jscale sweep` as two processes × 4 CPU devices (mesh runs=4, data=2) gives the unsharded
    group's results; only process 0 writes the results store."""
    runs = [r.override({"mesh.runs": 4, "mesh.data": 2}) for r in _group_a()]
    (tmp_path / "runs.json").write_text(json.dumps([r.to_dict() for r in runs]))
    script = tmp_path / "exp.py"
    script.write_text(MESH_SCRIPT.format(runs=str(tmp_path / "runs.json")))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jscale.cli", "sweep", str(script), "--preset", "mesh", "--out",
         str(tmp_path / "out"), "--quiet", "--coordinator", f"localhost:{free_port}",
         "--num-processes", "2", "--process-id", str(i)],
        env=env(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(4)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for i, proc in enumerate(procs):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"process {i}:\n{err[-3000:]}"
    df = sweep.load(tmp_path / "out")
    assert list(df["status"]) == ["ok"] * 4 and set(df["strategy"]) == {"vmap"}
    for col in ("final_eval_loss", "final_train_loss"):
        np.testing.assert_allclose(df[col], vmap_df[col].iloc[:4], **SWEEP_VMAP_VS_SEQUENTIAL)


# ---------------------------------------------------------------------------------------------------
# Issue #11: auto decisions keyed on chunk identity, a stable probe kept in the sweep, stale rows,
# placement-free run ids, isoflop with one size, lr_sweep's failed-vs-diverged.

from jscale.sweep import execute  # noqa: E402
from jscale.sweep import store as store_lib  # noqa: E402


class _Crash(BaseException):
    """Stands for a kill: not an ``Exception``, so ``sweep.run`` does not record it as a failure."""


def _fake_probe(members, *args, **kwargs):
    """A deterministic stand-in for the timed probe: seed-0 chunks vmap, the others sequential."""
    choice = "vmap" if members[0].train.seed == 0 else "sequential"
    return {"choice": choice, "R": len(members), "reason": "fake probe"}


@pytest.mark.slow
def test_auto_resume_trains_each_chunk_with_its_own_decision(tmp_path, monkeypatch):
    """Kill after chunk 0 of 2 committed, resume: chunk 1 keeps its own (sequential) decision instead
    of inheriting chunk 0's (vmap), so the resumed table equals the uninterrupted one bitwise."""
    monkeypatch.setattr(strategy_lib, "probe_strategies", _fake_probe)
    programs = strategy_lib.ProgramCache()  # the three sweeps share compiled programs (test speed)
    monkeypatch.setattr(strategy_lib, "ProgramCache", lambda: programs)
    runs = sweep.product(BASE, **{"train.seed": [0, 1], "optim.lr": [1e-3, 3e-3]})
    kw = dict(strategy="auto", max_group_size=2, progress=False)
    full = sweep.run(runs, tmp_path / "full", **kw)
    assert full["strategy"].tolist() == ["vmap", "vmap", "sequential", "sequential"]

    commit, commits = store_lib.ResultsStore.commit, []

    def crash_on_second(self, rows):
        commits.append(len(rows))
        if len(commits) == 2:
            raise _Crash
        return commit(self, rows)
    with monkeypatch.context() as mp:
        mp.setattr(store_lib.ResultsStore, "commit", crash_on_second)
        with pytest.raises(_Crash):
            sweep.run(runs, tmp_path / "killed", **kw)
    assert len(sweep.load(tmp_path / "killed")) == 2  # chunk 0 committed, chunk 1 not
    resumed = sweep.run(runs, tmp_path / "killed", **kw)
    assert resumed["strategy"].tolist() == full["strategy"].tolist()
    assert _comparable(resumed) == _comparable(full)


def test_decide_strategy_prefers_sequential_within_noise():
    decide = strategy_lib.decide_strategy
    assert execute.decide_strategy is decide  # still importable from where it was
    clear = decide([0.50, 0.52, 0.49, 0.51, 0.50])
    assert clear["choice"] == "vmap" and clear["ratio"] == 0.50 and clear["verdict"] == "vmap faster"
    assert clear["spread"] == pytest.approx(0.03 / (2 * 0.50))
    assert decide([0.98, 1.01, 0.99, 1.02, 0.97])["choice"] == "sequential"  # a tie
    narrow = decide([0.96] * 5)  # a 4 % win, no measured spread: below the 5 % floor
    assert narrow["choice"] == "sequential" and narrow["threshold"] == pytest.approx(0.95)
    assert "within noise" in narrow["verdict"]
    noisy = decide([0.5, 0.8, 0.82, 0.9, 1.1])  # median 0.82 but ±37 %: not a clear win
    assert noisy["choice"] == "sequential" and noisy["spread"] == pytest.approx(0.6 / 1.64)
    assert decide([0.80, 0.82, 0.84])["choice"] == "vmap"  # 18 % faster, ±2.4 %
    slower = decide([1.5, 1.6, 1.4])
    assert slower["choice"] == "sequential" and slower["verdict"] == "sequential faster"
    assert decide([0.5, float("nan"), 0.5])["repeats"] == 2
    with pytest.raises(ValueError, match="no finite"):
        decide([])
    line = strategy_lib.describe("sequential", {**noisy, "vmap_s_per_step": 1.0,
                                            "sequential_s_per_step": 1.2})
    assert "0.82 ± 0.37 over 5 repeats" in line and "within noise" in line


@pytest.mark.slow
def test_auto_probe_stays_in_the_sweep_unless_global(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("JSCALE_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("JSCALE_STRATEGY_CACHE", raising=False)
    programs = strategy_lib.ProgramCache()  # the sweeps share compiled programs (test speed)
    monkeypatch.setattr(strategy_lib, "ProgramCache", lambda: programs)
    runs = sweep.product(BASE, **{"train.seed": [0, 1]})
    df = sweep.run(runs, tmp_path / "a", strategy="auto", progress=False)
    assert list(cache.iterdir()) == [] and not (tmp_path / "home").exists()
    (probe,) = json.loads((tmp_path / "a" / "strategies.json").read_text()).values()
    assert probe["repeats"] == strategy_lib.PROBE_REPEATS and probe["spread"] >= 0
    assert probe["choice"] == ("vmap" if probe["ratio"] < probe["threshold"] else "sequential")
    assert set(df["strategy"]) == {probe["choice"]}

    sweep.run(runs, tmp_path / "b", strategy="auto", progress=False, strategy_cache="global")
    shared = json.loads((cache / "strategy_probe.json").read_text())
    assert len(shared) == 1
    # Opted in by the environment variable, another sweep reuses the shared probe: no probing.
    monkeypatch.setenv("JSCALE_STRATEGY_CACHE", "global")
    monkeypatch.setattr(strategy_lib, "probe_strategies",
                        lambda *a, **k: pytest.fail("probed again"))
    sweep.run(runs, tmp_path / "c", strategy="auto", progress=False)
    (probe_c,) = json.loads((tmp_path / "c" / "strategies.json").read_text()).values()
    assert probe_c["cached"] and probe_c["ratio"] == next(iter(shared.values()))["ratio"]
    monkeypatch.setenv("JSCALE_STRATEGY_CACHE", "everywhere")
    with pytest.raises(ConfigError, match="JSCALE_STRATEGY_CACHE"):
        sweep.run(runs, tmp_path / "d", strategy="auto", progress=False)


def test_rows_of_runs_edited_out_of_the_grid_are_marked(tmp_path):
    """Invalid grid points (no training) are committed like any run: after an edit of the grid, the
    rows of runs no longer in it stay in the table, marked ``in_latest_grid == False``."""
    def grid(heads):
        return sweep.product(BASE, **{"model.n_heads": heads})  # 32 % 3, 5, 7 != 0: all invalid
    first = sweep.run(grid([3, 5]), tmp_path, progress=False)
    assert first["in_latest_grid"].tolist() == [True, True]
    again = sweep.run(grid([5, 7]), tmp_path, progress=False)
    assert again["run_id"].tolist() == [sweep.run_id(r) for r in grid([5, 7])]
    assert again["in_latest_grid"].tolist() == [True, True]
    df = sweep.load(tmp_path)
    stale = {sweep.run_id(r): False for r in grid([3])}
    assert dict(zip(df["run_id"], df["in_latest_grid"], strict=True)) == {
        **stale, **{sweep.run_id(r): True for r in grid([5, 7])}}
    assert df["in_latest_grid"].dtype == bool
    frame = store_lib.ResultsStore(tmp_path).frame()
    assert frame["in_latest_grid"].tolist() == df["in_latest_grid"].tolist()
    (tmp_path / "grid.json").unlink()  # a directory written before grid.json existed
    assert sweep.load(tmp_path)["in_latest_grid"].all()


def test_run_id_ignores_where_a_run_runs_and_caches():
    assert sweep.grid.PLACEMENT_FIELDS == ("mesh", "data.cache_dir")
    moved = BASE.override({"mesh.runs": 4, "mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": 1,
                           "mesh.expert": 1, "data.cache_dir": "/somewhere/else"})
    assert {k for k in BASE.valid_keys() if k.startswith("mesh.")} <= {
        "mesh.runs", "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.expert"}
    assert sweep.run_id(moved) == sweep.run_id(BASE)
    assert sweep.run_id(BASE.override({"optim.lr": 1e-2})) != sweep.run_id(BASE)
    assert sweep.run_id(BASE.override({"data.val_every": 5})) != sweep.run_id(BASE)
    bad = sweep.product(BASE, **{"model.n_heads": [3]})[0]
    bad_moved = sweep.product(moved, **{"model.n_heads": [3], "mesh.runs": [2]})[0]
    assert isinstance(bad_moved, sweep.InvalidRun) and bad_moved.run_id == bad.run_id
    # Programs and groups still tell meshes apart: they are keyed on the whole config.
    sig, sig_moved = group_lib.signature(BASE), group_lib.signature(moved)
    assert execute._digest(sig.to_dict()) != execute._digest(sig_moved.to_dict())


@pytest.mark.slow
def test_rerun_on_another_mesh_skips_finished_runs(vmap_df, traced, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(vmap_df.attrs["out"], out)
    before = len(traced)
    df = sweep.run([r.override({"mesh.runs": 4, "mesh.data": 2}) for r in _group_a()], out,
                   strategy="vmap", progress=False)
    assert len(traced) == before  # nothing retrained, nothing compiled
    assert _comparable(df) == _comparable(vmap_df.iloc[:4])


def test_isoflop_with_one_size_and_none():
    base = BASE.override({"train.batch_size": 8, "train.seq_len": 64})
    (run,) = sweep.isoflop(base, [1e12], n_sizes=1)
    n_star = math.sqrt(1e12 / (6 * 20.0))
    assert jscale.count_params(run.model)["non_embedding"] == jscale.count_params(
        sweep.shape_for_params(n_star, base.model))["non_embedding"]
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="n_sizes"):
            sweep.isoflop(base, [1e12], n_sizes=bad)


def test_lr_sweep_analysis_does_not_count_failed_runs_as_diverged(tmp_path, capsys):
    import pandas as pd

    from jscale.cli.script import load_script
    lr_sweep = load_script(Path(__file__).resolve().parents[1] / "experiments" / "lr_sweep.py")
    common = {"n_params": 1000, "tokens": 5000}
    df = pd.DataFrame([
        {"status": "ok", "optim.lr": 1e-3, "final_eval_loss": 2.0, "diverged": False, **common},
        {"status": "ok", "optim.lr": 3e-3, "final_eval_loss": 1.9, "diverged": False, **common},
        {"status": "ok", "optim.lr": 1e-1, "final_eval_loss": None, "diverged": True, **common},
        {"status": "failed", "optim.lr": 3e-2, "error": "data.path: no such file"},
    ])
    lr_sweep.analyze(df, tmp_path)
    assert "(1 diverged, 1 failed)" in capsys.readouterr().out
    assert (tmp_path / "lr_sweep.png").exists()
    ok, diverged, failed = lr_sweep.split(df)
    assert ok["optim.lr"].tolist() == [1e-3, 3e-3]
    assert diverged["optim.lr"].tolist() == [1e-1] and failed["optim.lr"].tolist() == [3e-2]


def test_experiment_script_overrides_reach_the_grid_and_every_run():
    from jscale.cli.script import build_grid

    def grid(preset):
        return sweep.product(BASE, **{"optim.lr": [1e-3, 2e-3]})

    seen = {}

    def sized(preset, overrides):
        seen.update(overrides)
        return [BASE.override(overrides)]

    runs = build_grid(grid, "cpu", {"train.seed": "3"})
    assert [r.train.seed for r in runs] == [3, 3] and [r.optim.lr for r in runs] == [1e-3, 2e-3]
    assert build_grid(sized, "cpu", {"data.val_every": "5"})[0].data.val_every == 5
    assert seen == {"data.val_every": "5"}
    with pytest.raises(ConfigError, match="unknown config key"):
        build_grid(grid, "cpu", {"train.sed": "3"})


# ---------------------------------------------------------------------------------------------------
# Issue #12: one training core — aux metrics and model state in sweeps, rows built like train()'s.


@pytest.mark.slow
def test_aux_metrics_and_model_state_per_member_in_a_sweep(tmp_path, monkeypatch):
    """Every aux value reaches the sweep curves; the non-gradient model state is per member in a
    vmapped group: updated only while the member is active, frozen with the rest of its state."""
    patch_stateful_forward(monkeypatch)
    runs = _group_a()  # 12, 12, 8, 12 steps
    df = sweep.run(runs, tmp_path, strategy="vmap", progress=False)
    for rid, r in zip(df["run_id"], runs, strict=True):
        curve = sweep.load_curve(tmp_path, rid)
        assert list(curve[STATE_METRIC]) == [s - 1 for s in curve["step"]]  # the state it was given
        assert curve["step"].iloc[-1] == r.train.steps and curve["logit_mean"].notna().all()
    common = group_lib.signature(runs[0])
    progs = group_lib.build_programs(common, "vmap")
    state, alive = progs.init(group_lib._member_data(runs[:3]))
    batch = {k: np.zeros((3, 4, 32), np.int32) for k in ("inputs", "targets", "segment_ids")}
    for step in range(3):
        state, alive, _ = progs.step(state, alive, batch, np.array([True, step < 1, False]))
    np.testing.assert_array_equal(state.model_state[STATE_LEAF], [3, 1, 0])
    np.testing.assert_array_equal(state.step, [3, 1, 0])


@pytest.mark.slow
def test_a_sweep_members_curve_is_its_train_rows(tmp_path):
    """A sweep member's curve and result come from the same builders as a single run's rows and
    summary: the same keys, the same values (within a vmapped-vs-alone tolerance)."""
    member = _group_a()[1]
    df = sweep.run(_group_a()[:2], tmp_path / "sweep", strategy="vmap", progress=False)
    alone = train.train(member.override({"train.checkpoint_every": 0}), tmp_path / "alone",
                        quiet=True)
    curve = jscale.files.read_jsonl(tmp_path / "sweep" / "curves" / f"{df['run_id'].iloc[1]}.jsonl")
    rows = metrics_rows(tmp_path / "alone")
    assert [list(r) for r in curve] == [list(r) for r in rows]
    for got, want in zip(curve, rows, strict=True):
        for k, v in want.items():
            if isinstance(v, float) and k not in ("step", "tokens"):
                np.testing.assert_allclose(got[k], v, **SWEEP_VMAP_VS_SEQUENTIAL, err_msg=k)
            else:
                assert got[k] == v, k
    result = df.iloc[1].to_dict()
    for k, v in alone.items():
        if k == "wall_time_s":
            continue
        if v is None:
            assert result[k] is None or np.isnan(result[k]), k
        elif isinstance(v, float):
            np.testing.assert_allclose(result[k], v, **SWEEP_VMAP_VS_SEQUENTIAL, err_msg=k)
        else:
            assert result[k] == v, k
