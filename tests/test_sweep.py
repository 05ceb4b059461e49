"""Sweeps: grids, grouping, vmap ≡ sequential, one compile per group, divergence isolation, the
results store, failures, the runs mesh axis, and kill-and-resume equality."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tolerances import F32_REORDER, SWEEP_VMAP_VS_SEQUENTIAL

import jscale
from jscale import sweep, train
from jscale.config import ConfigError, parse_overrides
from jscale.sweep import group as group_lib

MICRO = ["model.d_model=32", "model.n_layers=1", "model.d_ff=64", "model.n_heads=2",
         "model.n_kv_heads=1", "train.seq_len=32", "train.batch_size=4", "train.steps=12",
         "train.log_every=4", "train.eval_every=6", "train.eval_batches=1", "optim.warmup_steps=2"]
BASE = jscale.presets.get("tiny").override(parse_overrides(MICRO))
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
    original = train.train_step

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch_module.setattr(train, "train_step", counting)
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


def test_one_compile_per_group(vmap_df):
    assert vmap_df["group_id"].nunique() == 2
    assert vmap_df.attrs["compiles"] == 2
    assert set(vmap_df["group_compiles"]) == {1}


def test_vmap_equals_sequential(vmap_df, sequential_df):
    assert list(vmap_df["run_id"]) == list(sequential_df["run_id"])
    for col in ("final_train_loss", "final_eval_loss", "min_eval_loss"):
        np.testing.assert_allclose(vmap_df[col], sequential_df[col], **SWEEP_VMAP_VS_SEQUENTIAL)
    assert set(vmap_df["strategy"]) == {"vmap"} and set(sequential_df["strategy"]) == {"sequential"}


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
                "strategy", "device_kind", "jax_version"):
        assert col in vmap_df.columns, col
    assert _comparable(sweep.load(out)) == _comparable(vmap_df)


def test_divergence_isolated(vmap_df, tmp_path):
    df = sweep.run(_group_a(lr_of_last=1e30), tmp_path, strategy="vmap", progress=False)
    assert df["diverged"].tolist() == [False, False, False, True]
    assert df["diverged_step"].iloc[3] >= 1 and df["final_eval_loss"].isna().iloc[3]
    for col in ("final_train_loss", "final_eval_loss", "min_eval_loss"):  # bitwise
        assert df[col].iloc[:3].tolist() == vmap_df[col].iloc[:3].tolist()


def test_failed_runs_are_reported_and_the_sweep_goes_on(tmp_path):
    bad_data = BASE.override({"data.path": str(tmp_path / "missing.txt"), "model.d_model": 40,
                              "model.n_heads": 2})
    runs = sweep.product(BASE, **{"model.n_heads": [3]}) + [bad_data] + GROUP_B
    df = sweep.run(runs, tmp_path / "out", strategy="vmap", progress=False)
    assert df["status"].tolist() == ["failed", "failed", "ok"]
    assert "model.d_model" in df["error"].iloc[0] and "data.path" in df["error"].iloc[1]
    assert np.isfinite(df["final_eval_loss"].iloc[2])


def test_max_group_size_splits(vmap_df, tmp_path):
    df = sweep.run(_group_a(), tmp_path, strategy="vmap", max_group_size=2, progress=False)
    assert df["group_size"].tolist() == [2, 2, 2, 2]
    np.testing.assert_allclose(df["final_eval_loss"], vmap_df["final_eval_loss"].iloc[:4],
                               **SWEEP_VMAP_VS_SEQUENTIAL)


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
    sweep.main(grid)
"""


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    script = tmp_path / "exp.py"
    script.write_text(SCRIPT.format(micro=MICRO))
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo}

    def cmd(out, *extra):
        return [sys.executable, str(script), "--preset", "cpu", "--out", str(out),
                "--strategy", "vmap", "--quiet", *extra]

    subprocess.run(cmd(tmp_path / "full"), env=env, check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed, "--slow-second-group"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = killed / "results.jsonl"
    while proc.poll() is None and not (results.exists() and results.read_text().count("\n") >= 2):
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(sweep.load(killed)) == 2  # the first group committed, the second not
    # The same line via `jscale sweep` resumes and completes it.
    subprocess.run([sys.executable, "-m", "jscale.cli", "sweep", *cmd(killed)[1:]], env=env,
                   check=True, capture_output=True, timeout=600)
    full, resumed = sweep.load(tmp_path / "full"), sweep.load(killed)
    assert len(resumed) == 3 and resumed["run_id"].is_unique
    key = "run_id"
    assert (_comparable(full.sort_values(key).reset_index(drop=True)) ==
            _comparable(resumed.sort_values(key).reset_index(drop=True)))


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
from jscale import sweep
from jscale.config import RunConfig

def grid(preset):
    return [RunConfig.from_dict(d) for d in json.loads(open({runs!r}).read())]

if __name__ == "__main__":
    sweep.main(grid)
"""


def test_two_process_sweep_equals_unsharded(vmap_df, tmp_path, free_port):
    """`jscale sweep` as two processes × 4 CPU devices (mesh runs=4, data=2) gives the unsharded
    group's results; only process 0 writes the results store."""
    runs = [r.override({"mesh.runs": 4, "mesh.data": 2}) for r in _group_a()]
    (tmp_path / "runs.json").write_text(json.dumps([r.to_dict() for r in runs]))
    script = tmp_path / "exp.py"
    script.write_text(MESH_SCRIPT.format(runs=str(tmp_path / "runs.json")))
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jscale.cli", "sweep", str(script), "--preset", "mesh", "--out",
         str(tmp_path / "out"), "--quiet", "--coordinator", f"localhost:{free_port}",
         "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for i, proc in enumerate(procs):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"process {i}:\n{err[-3000:]}"
    df = sweep.load(tmp_path / "out")
    assert list(df["status"]) == ["ok"] * 4 and set(df["strategy"]) == {"vmap"}
    for col in ("final_eval_loss", "final_train_loss"):
        np.testing.assert_allclose(df[col], vmap_df[col].iloc[:4], **SWEEP_VMAP_VS_SEQUENTIAL)
