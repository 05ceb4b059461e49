"""Grown runs in a sweep: sources join the grid once, train before the runs grown from them, the
rows record the lineage, a rerun trains nothing, an interrupted sweep resumes to the same rows, and
a source that cannot be built is a clear error."""

from pathlib import Path

import pandas as pd
import pytest
from helpers import micro_cfg

from jscale import sweep, train
from jscale.checkpoint import Checkpointer
from jscale.config import ConfigError
from jscale.sweep import lineage

MICRO = ["model.d_model=32", "model.n_layers=4", "model.d_ff=64", "model.n_heads=2",
         "model.n_kv_heads=1", "train.seq_len=16", "train.batch_size=2", "train.steps=6",
         "train.log_every=3", "train.eval_every=6", "train.eval_batches=1",
         "train.checkpoint_every=3", "optim.warmup_steps=1"]
SCRATCH = micro_cfg(MICRO)
GROWN = SCRATCH.override({"growth.op": "stack:2", "growth.source_steps": 4})
SOURCE = SCRATCH.override({"model.n_layers": 2, "train.steps": 4})  # what GROWN's growth names
#: Row fields that differ between two sweeps of the same runs: timings and the run directories.
VARIES = {"wall_time_s", "group_wall_time_s", "tokens_per_s", "source_run"}


def _grid():
    """Two runs grown from one source, a scratch run, and that source listed again at the end."""
    return sweep.product(GROWN, **{"growth.op": ["stack:2", "interpolate:2"]}) + [SCRATCH, SOURCE]


@pytest.fixture
def trained(monkeypatch):
    """The run ids of the single runs that train (one entry per training, in order)."""
    calls = []
    make = train.make_train_step

    def counting(cfg, *args, **kwargs):
        calls.append(sweep.run_id(cfg))
        return make(cfg, *args, **kwargs)
    monkeypatch.setattr(train, "make_train_step", counting)
    return calls


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("grown")
    with pytest.MonkeyPatch.context() as mp:
        calls = []
        make = train.make_train_step
        mp.setattr(train, "make_train_step",
                   lambda cfg, *a, **k: calls.append(sweep.run_id(cfg)) or make(cfg, *a, **k))
        df = sweep.run(_grid(), out, strategy="sequential", progress=False)
    return out, df, calls


def _ids():
    stack, interp = sweep.product(GROWN, **{"growth.op": ["stack:2", "interpolate:2"]})
    return {k: sweep.run_id(v) for k, v in
            {"source": SOURCE, "stack": stack, "interp": interp, "scratch": SCRATCH}.items()}


def _same_rows(a, b, *, skip=VARIES):
    """The two frames hold the same rows (in any order), exactly (NaN equal to NaN), but for
    ``skip``."""
    def rows(df):
        df = df.drop(columns=[c for c in df.columns if c in skip])
        return df.sort_values("run_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(rows(a), rows(b), check_exact=True, check_dtype=False)


def test_expand_adds_each_source_once_before_its_runs():
    assert sweep.run_id(GROWN.source_config()) == sweep.run_id(SOURCE)
    ids = _ids()
    wanted = {sweep.run_id(r): r for r in _grid()}
    members, source_of = lineage.expand(wanted)
    assert list(members) == [ids["source"], ids["stack"], ids["interp"], ids["scratch"]]
    assert source_of == {ids["stack"]: ids["source"], ids["interp"]: ids["source"]}
    alone, _ = lineage.expand({ids["scratch"]: SCRATCH})  # no growth: the grid as it is
    assert list(alone) == [ids["scratch"]]


def test_a_source_that_cannot_be_built_is_a_clear_error(tmp_path, trained):
    with pytest.raises(ConfigError, match=r"growth\.source: the source run .* not valid: "
                                          r"model\.d_model: must be divisible by model\.n_heads=3"):
        GROWN.override({"growth.source": ["model.n_heads=3"]})
    with pytest.raises(ConfigError, match=r"growth\.source: unknown config key 'model\.d_modl'"):
        sweep.product(GROWN, **{"growth.source": [["model.d_modl=16"]]})
    with pytest.raises(ConfigError, match=r"growth\.op: .* model\.n_layers=4 by 3"):
        GROWN.override({"growth.op": "stack:3"})
    bad = sweep.product(GROWN, **{"growth.source": [["model.n_heads=3"]]})
    assert isinstance(bad[0], sweep.InvalidRun) and "growth.source" in bad[0].error
    df = sweep.run(bad, tmp_path, progress=False)  # recorded as failed; nothing trains
    assert list(df["status"]) == ["failed"] and "growth.source" in df["error"].iloc[0]
    assert trained == [] and not (tmp_path / lineage.RUNS).exists()


@pytest.mark.slow
def test_sources_train_once_before_grown_runs_and_rows_record_lineage(swept):
    out, df, calls = swept
    ids = _ids()
    # Single runs: the shared (and listed) source once, first; then each grown run once. The
    # scratch run trains in the vmapped-group path, not as a single run.
    assert calls == [ids["source"], ids["stack"], ids["interp"]]
    assert sorted(p.name for p in (out / lineage.RUNS).iterdir()) == sorted(calls)
    assert list(df["run_id"]) == [ids["source"], ids["stack"], ids["interp"], ids["scratch"]]
    assert (df["status"] == "ok").all() and df["in_latest_grid"].all()
    rows = df.set_index("run_id")
    src, scratch = rows.loc[ids["source"]], rows.loc[ids["scratch"]]
    assert src["steps"] == 4 and src["model.n_layers"] == 2 and src["strategy"] == "single"
    assert src["group_id"] == f"runs/{ids['source']}" and pd.isna(src["source_run_id"])
    for name, op in (("stack", "stack:2"), ("interp", "interpolate:2")):
        g = rows.loc[ids[name]]
        assert g["source_run_id"] == ids["source"] and g["growth_op"] == op
        assert g["growth.op"] == op and g["strategy"] == "single" and g["model.n_layers"] == 4
        assert g["source_step"] == 4
        assert Path(g["source_run"]) == (out / lineage.RUNS / ids["source"]).resolve()
        assert g["source_tokens"] == src["tokens"] == 4 * 2 * 16
        assert g["source_flops"] == src["flops"]
        assert g["total_flops"] == g["flops"] + g["source_flops"]
        assert g["total_tokens"] == g["tokens"] + g["source_tokens"] == (6 + 4) * 2 * 16
        assert list(sweep.load_curve(out, ids[name])["step"]) == [3, 6]
    # Rows not grown: no lineage, their own compute is the total.
    for r in (src, scratch):
        assert pd.isna(r["growth_op"]) and r["total_flops"] == r["flops"]
        assert r["total_tokens"] == r["tokens"]
    assert scratch["strategy"] == "sequential" and pd.isna(scratch["source_run_id"])
    _same_rows(sweep.load(out), df, skip=())


@pytest.mark.slow
def test_rerun_of_a_finished_sweep_trains_nothing(swept, trained):
    out, df, _ = swept
    again = sweep.run(_grid(), out, strategy="sequential", progress=False)
    assert trained == []
    _same_rows(again, df, skip=())


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_the_same_rows(swept, tmp_path, monkeypatch, trained):
    """Stop a sweep of one grown run right after its step-3 checkpoint (its source finished and
    committed): the rerun trains only the grown run, from its checkpoint, and gives the rows of the
    uninterrupted sweep."""
    _, full, _ = swept
    ids = _ids()
    grid = sweep.product(GROWN, **{"growth.op": ["stack:2"]})
    crash_in = str(tmp_path / lineage.RUNS / ids["stack"])
    save = Checkpointer.save

    def crashing(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if str(self.directory).startswith(crash_in) and step == 3:
            self.close()  # the checkpoint is complete, as a SIGKILL right after it would leave it
            raise KeyboardInterrupt  # not an Exception: nothing in the sweep catches it
    monkeypatch.setattr(Checkpointer, "save", crashing)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(grid, tmp_path, progress=False)
    assert trained == [ids["source"], ids["stack"]]
    assert list(sweep.load(tmp_path)["run_id"]) == [ids["source"]]
    monkeypatch.setattr(Checkpointer, "save", save)
    trained.clear()
    df = sweep.run(grid, tmp_path, progress=False)
    assert trained == [ids["stack"]]  # the source is not retrained
    _same_rows(df, full[full["run_id"].isin([ids["source"], ids["stack"]])])
    resumed = pd.read_json(tmp_path / lineage.RUNS / ids["stack"] / "metrics.jsonl", lines=True)
    assert list(resumed["step"]) == [3, 6]

def test_a_grown_run_whose_source_failed_fails_too(tmp_path, trained):
    """A source planned past ``data.max_epochs`` fails before any step; its grown run is recorded
    as failed, naming the source, without training."""
    grown = GROWN.override({"data.max_epochs": 1e-9})
    sid = sweep.run_id(grown.source_config())
    df = sweep.run([grown], tmp_path, progress=False).set_index("run_id")
    assert list(df.index) == [sid, sweep.run_id(grown)] and (df["status"] == "failed").all()
    assert "data.max_epochs" in df.loc[sid, "error"]
    assert df.loc[sweep.run_id(grown), "error"].startswith(f"source {sid} failed: ")
    assert trained == []
