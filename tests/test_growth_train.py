"""Growth in training (``jscale train --init-from RUN --grow OP``, :func:`jscale.train.with_growth`,
:func:`jscale.train.grow_start`):
the ``--grow`` grammar, the grown run starting from the operator's output of the source's newest
checkpoint, a function-preserving operator continuing the source's loss, the lineage and total
compute in ``summary.json``, resume after SIGKILL, and bad input (exit 2, one line naming the flag).
The operators themselves are tested in tests/test_growth.py."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import env, finish, kill_mid_training, metrics_rows, micro_cfg, train_args
from tolerances import F32_REORDER

from jscale import core, growth, models, optim, records
from jscale import data as data_lib
from jscale.cli import main as cli_main
from jscale.config import ConfigError
from jscale.train import grow_start, load_state, with_growth

COMMON = ["train.batch_size=4", "train.seq_len=32", "train.eval_batches=2", "optim.warmup_steps=2"]
#: The source: ``tiny`` with one layer, 4 steps (its newest checkpoint is the last step's).
SMALL = COMMON + ["model.n_layers=1", "train.steps=4", "train.log_every=2", "train.eval_every=4",
                  "train.checkpoint_every=2"]
#: The grown run: two layers, 12 steps, a row every step, checkpoints every 4.
BIG = COMMON + ["model.n_layers=2", "train.steps=12", "train.log_every=1", "train.eval_every=12",
                "train.checkpoint_every=4"]


def grown_params_from(source, cfg, op: str):
    """``(params, lineage)`` of ``cfg`` grown from the run in ``source`` by ``op``."""
    params, _, lineage = grow_start(with_growth(cfg, source, op), source)
    return params, lineage


def grow_args(out, source, op: str, overrides=BIG) -> list[str]:
    return train_args(out, overrides) + ["--init-from", str(source), "--grow", op]


def first_batch(cfg) -> dict:
    """The first training batch of ``cfg``'s run (as :func:`jscale.train.train` draws it)."""
    tc = cfg.train
    corpus = data_lib.load_corpus(cfg.data, cfg.model.vocab_size, tc.seq_len)
    return next(iter(data_lib.train_dataset(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                            seed=tc.seed)))


def batch_loss(params, cfg) -> float:
    return float(jax.jit(lambda p, b: core.loss_fn(p, b, cfg.model)[0])(params, first_batch(cfg)))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    assert cli_main(train_args(out, SMALL)) == 0
    return out


@pytest.fixture(scope="module")
def grown_run(small_run, tmp_path_factory):
    """``small_run`` grown by G_stack into two layers and trained 12 steps (a CLI subprocess)."""
    out = tmp_path_factory.mktemp("grown") / "run"
    finish(subprocess.Popen([sys.executable, "-m", "jscale.cli", *grow_args(out, small_run,
                                                                             "stack:2")],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return out


# ---------------------------------------------------------------------------------------------------
# the grammar and the lineage arithmetic


@pytest.mark.parametrize("text,canonical,factor,options", [
    ("stack:4", "stack:4", 4, {}), ("interpolate:2", "interpolate:2", 2, {}),
    ("zero:2", "zero:2", 2, {"placement": "interleave"}),
    ("zero:2:interleave", "zero:2", 2, {"placement": "interleave"}),
    ("zero:3:end", "zero:3:end", 3, {"placement": "end"}),
    ("zero", "zero", None, {}), ("direct_width", "direct_width", None, {}),
    ("random:2", "random:2", 2, {}), ("random", "random", None, {}),
    ("learn:2", "learn:2", 2, {}), ("learn", "learn", None, {}),
    ("zero_depth:2", "zero:2", 2, {"placement": "interleave"}), ("zero_width", "zero", None, {}),
    ("direct_width:2", "direct_width:2", None, {})])
def test_grow_grammar(text, canonical, factor, options):
    spec = growth.parse_spec(text)
    assert (str(spec), spec.factor, spec.options) == (canonical, factor, options)
    assert spec.grows == ("width" if factor is None else "depth")
    assert growth.parse_spec(str(spec)) == spec


@pytest.mark.parametrize("text,match", [
    ("stack:1", "integer >= 2"), ("stack:x", "integer >= 2"), ("stack:-2", "integer >= 2"),
    ("stack", "write stack:G"), ("interpolate", "write interpolate:G"),
    ("direct_width:1", "d_model factor"), ("direct_width:2:end", "d_model factor"),
    ("zero_depth", "write zero_depth:G"), ("zero_width:2", "no :G"),
    ("splice:2", "unknown growth operator 'splice'"),
    ("random:2:end", "placement"),
    ("zero:2:middle", "placement"), ("stack:2:end", "placement"), ("zero:2:end:x", "':' fields")])
def test_grow_grammar_refusals_name_the_flag(text, match):
    with pytest.raises(ConfigError, match=r"^--grow: .*" + match):
        growth.parse_spec(text)


def test_help_lists_every_operator_of_the_table(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, op in growth.OPERATORS.items():
        assert f"{name} ({op.grows}{'' if op.supported else ', not built yet'})" in text


def test_lineage_counts_the_source_and_its_own_sources():
    cfg = micro_cfg(SMALL)
    fpt = models.flops_per_token(cfg.model, 32)["training"]
    first = records.lineage(cfg, 4, source_run="/a", growth_op="stack:2")
    assert first == {"source_run": "/a", "source_step": 4, "growth_op": "stack:2",
                     "source_tokens": 4 * 4 * 32, "source_flops": fpt * (4 * 4 * 32),
                     "growth_flops": 0.0}
    chained = records.lineage(cfg, 2, source_run="/b", growth_op="zero:2", source_lineage=first)
    assert chained["source_tokens"] == 2 * 4 * 32 + first["source_tokens"]
    assert chained["source_flops"] == fpt * (2 * 4 * 32) + first["source_flops"]
    summary = records.with_lineage({"tokens": 10, "flops": 7.0}, first)
    assert summary["total_tokens"] == 10 + first["source_tokens"]
    assert summary["total_flops"] == 7.0 + first["source_flops"]
    learned = records.lineage(cfg, 4, source_run="/a", growth_op="learn:2", growth_flops=5.0)
    assert records.with_lineage({"tokens": 10, "flops": 7.0}, learned)["total_flops"] == (
        7.0 + first["source_flops"] + 5.0)
    chained = records.lineage(cfg, 2, source_run="/b", growth_op="zero:2", source_lineage=learned)
    assert chained["source_flops"] == fpt * (2 * 4 * 32) + first["source_flops"] + 5.0


# ---------------------------------------------------------------------------------------------------
# bad input: exit 2, one line naming the flag


def _exit_2(capsys, args) -> str:
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("op,match", [("stack:1", "--grow: the depth factor G"),
                                      ("stack", "--grow: 'stack' grows the depth"),
                                      ("splice:2", "--grow: unknown growth operator")])
def test_bad_grow_exits_2(capsys, tmp_path, op, match):
    assert match in _exit_2(capsys, grow_args(tmp_path / "out", tmp_path, op))


def test_grow_without_init_from_exits_2(capsys, tmp_path):
    err = _exit_2(capsys, train_args(tmp_path / "out", BIG) + ["--grow", "stack:2"])
    assert "--grow: needs --init-from" in err


def test_grow_from_a_directory_without_a_checkpoint_exits_2(capsys, tmp_path):
    (tmp_path / "src" / "checkpoints").mkdir(parents=True)
    (tmp_path / "src" / "config.json").write_text(json.dumps(micro_cfg(SMALL).to_dict()))
    err = _exit_2(capsys, grow_args(tmp_path / "out", tmp_path / "src", "stack:2"))
    assert "--init-from" in err and "no complete checkpoint" in err
    err = _exit_2(capsys, grow_args(tmp_path / "out", tmp_path / "src" / "checkpoints", "stack:2"))
    assert "--init-from" in err and "not a jscale run directory" in err


def test_grow_from_a_hugging_face_directory_exits_2(capsys, tmp_path):
    from jscale import hf
    cfg = micro_cfg(SMALL)
    hf.save(tmp_path / "hf", cfg.model, models.init(jax.random.PRNGKey(0), cfg.model))
    err = _exit_2(capsys, grow_args(tmp_path / "out", tmp_path / "hf", "stack:2"))
    assert "--init-from" in err and "Hugging Face" in err


@pytest.mark.slow
def test_grow_into_the_wrong_shape_exits_2_naming_both_shapes(capsys, small_run, tmp_path):
    err = _exit_2(capsys, grow_args(tmp_path / "a", small_run, "stack:2",
                                    BIG + ["model.n_layers=3"]))
    assert err.startswith("jscale train: error: --grow: 'stack:2' makes 2 × 1 = 2 layers")
    assert "n_layers=1" in err and "n_layers=3" in err  # both shapes
    err = _exit_2(capsys, grow_args(tmp_path / "b", small_run, "stack:2", BIG + ["model.d_ff=512"]))
    assert "--grow" in err and "model.d_ff" in err and "d_ff=384" in err and "d_ff=512" in err
    err = _exit_2(capsys, grow_args(tmp_path / "c", small_run, "zero"))  # width: keeps the depth
    assert "--grow: 'zero' grows the width" in err and "n_layers=2" in err


# ---------------------------------------------------------------------------------------------------
# training


@pytest.mark.slow
def test_grown_run_starts_from_the_grown_checkpoint_and_records_its_lineage(small_run, grown_run):
    small_cfg, cfg = micro_cfg(SMALL), micro_cfg(BIG)
    source = load_state(small_cfg, small_run)
    assert int(source.step) == 4  # the newest checkpoint
    expected = growth.grow(source.params, small_cfg.model, cfg.model, "stack")
    params, lineage = grown_params_from(small_run, cfg, "stack:2")
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    # The run's first step trained those parameters: its loss is theirs on the first batch.
    rows = metrics_rows(grown_run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    np.testing.assert_allclose(rows[0]["loss"], batch_loss(expected, cfg), **F32_REORDER)
    fresh = models.init(jax.random.split(jax.random.PRNGKey(cfg.train.seed))[0], cfg.model)
    assert abs(rows[0]["loss"] - batch_loss(fresh, cfg)) > 1e-2
    # Lineage: lineage.json, and the summary with the total compute.
    small = json.loads((small_run / "summary.json").read_text())
    assert json.loads((grown_run / "lineage.json").read_text()) == lineage == {
        "source_run": str(small_run.resolve()), "source_step": 4, "growth_op": "stack:2",
        "source_tokens": small["tokens"], "source_flops": small["flops"], "growth_flops": 0.0}
    summary = json.loads((grown_run / "summary.json").read_text())
    assert {k: summary[k] for k in lineage} == lineage
    assert summary["total_flops"] == summary["flops"] + small["flops"]
    assert summary["total_tokens"] == summary["tokens"] + small["tokens"]
    assert summary["flops"] == models.flops_per_token(cfg.model, 32)["training"] * (12 * 4 * 32)


@pytest.mark.slow
def test_zero_depth_growth_continues_the_source_loss(small_run, tmp_path):
    """G_zero adds identity layers: the grown run's first step has the source model's loss on that
    batch."""
    out = tmp_path / "zero"
    one_step = BIG + ["train.steps=1"]
    assert cli_main(grow_args(out, small_run, "zero:2", one_step)) == 0
    small_cfg, cfg = micro_cfg(SMALL), micro_cfg(one_step)
    source = load_state(small_cfg, small_run).params
    loss = metrics_rows(out)[0]["loss"]
    np.testing.assert_allclose(loss, batch_loss(source, small_cfg), **F32_REORDER)
    assert batch_loss(source, small_cfg) == pytest.approx(batch_loss(
        grown_params_from(small_run, cfg, "zero:2")[0], cfg), rel=F32_REORDER["rtol"])


@pytest.mark.slow
def test_grown_run_resumes_bitwise_after_sigkill(small_run, grown_run, tmp_path, capsys):
    out = tmp_path / "killed"
    # past the first checkpoint (step 4: its row is written after the checkpoint), mid-training
    kill_mid_training(grow_args(out, small_run, "stack:2"), out, after_step=6)
    assert (out / "lineage.json").exists()
    finish(subprocess.Popen([sys.executable, "-m", "jscale.cli",
                             *grow_args(out, small_run, "stack:2")], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert metrics_rows(out) == metrics_rows(grown_run)
    cfg = with_growth(micro_cfg(BIG), small_run, "stack:2")
    jax.tree.map(np.testing.assert_array_equal, load_state(cfg, out), load_state(cfg, grown_run))
    got, want = (json.loads((d / "summary.json").read_text()) for d in (out, grown_run))
    assert {k: v for k, v in got.items() if k != "wall_time_s"} == {
        k: v for k, v in want.items() if k != "wall_time_s"}
    # A rerun must bring the same growth.
    err = _exit_2(capsys, grow_args(out, small_run, "interpolate:2"))
    assert "different config" in err and "growth.op: 'stack:2' -> 'interpolate:2'" in err


# ---------------------------------------------------------------------------------------------------
# G_random, G_learn and grown optimizer state from the command line


@pytest.mark.slow
def test_random_growth_starts_from_the_source_function(small_run, tmp_path):
    """``--grow random:2 --grow-steps 2``: at step 0 the blend is 0, so the first loss is the
    source model's on that batch; config.json records the growth section."""
    out, few = tmp_path / "random", BIG + ["train.steps=3", "train.checkpoint_every=3"]
    assert cli_main(grow_args(out, small_run, "random:2", few) + ["--grow-steps", "2"]) == 0
    small_cfg = micro_cfg(SMALL)
    source = load_state(small_cfg, small_run).params
    np.testing.assert_allclose(metrics_rows(out)[0]["loss"], batch_loss(source, small_cfg),
                               **F32_REORDER)
    saved = json.loads((out / "config.json").read_text())["growth"]
    assert saved["op"] == "random:2" and saved["grow_steps"] == 2 and saved["source_steps"] == 4


@pytest.mark.slow
def test_grown_optimizer_state_is_the_first_step_s_adam_state(small_run, tmp_path):
    """``--grow-optimizer-state``: the run's one step is the step from the grown params *and* the
    source's Adam moments grown by the same maps (and differs from a fresh optimizer's)."""
    out, one = tmp_path / "moments", BIG + ["train.steps=1", "train.checkpoint_every=1"]
    assert cli_main(grow_args(out, small_run, "zero:2", one) + ["--grow-optimizer-state"]) == 0
    cfg = with_growth(micro_cfg(one), small_run, "zero:2", grow_optimizer_state=True)
    params, opt_state, _ = grow_start(cfg, small_run)
    src = load_state(micro_cfg(SMALL), small_run)
    jax.tree.map(np.testing.assert_array_equal, opt_state, growth.grow_optimizer_state(
        src.opt_state, src.params, micro_cfg(SMALL).model, cfg.model, "zero"))
    optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
    step = jax.jit(lambda s, b: core.train_step(s, b, cfg=cfg, optimizer=optimizer)[0])
    want = step(core.init_state(cfg, optimizer, params=params, opt_state=opt_state),
                first_batch(cfg))
    got = load_state(cfg, out)
    jax.tree.map(np.testing.assert_array_equal, got.params, want.params)
    fresh = step(core.init_state(cfg, optimizer, params=params), first_batch(cfg))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got.params),
                                                        jax.tree.leaves(fresh.params), strict=True))


@pytest.mark.slow
def test_learned_growth_counts_its_compute(small_run, tmp_path):
    out, one = tmp_path / "learn", BIG + ["train.steps=1", "train.checkpoint_every=1"]
    assert cli_main(grow_args(out, small_run, "learn:2", one) + ["--learn-steps", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cfg = micro_cfg(one)
    fpt = models.flops_per_token(cfg.model, 32)["training"]
    assert summary["growth_op"] == "learn:2" and summary["growth_flops"] == fpt * (2 * 4 * 32)
    small = json.loads((small_run / "summary.json").read_text())
    assert summary["total_flops"] == summary["flops"] + small["flops"] + summary["growth_flops"]


def test_growth_flags_without_grow_exit_2(capsys, tmp_path):
    err = _exit_2(capsys, train_args(tmp_path / "out", BIG) + ["--grow-steps", "3"])
    assert "--grow-steps" in err and "go with --grow" in err


def test_direct_width_factor_is_checked_against_the_configs():
    from jscale import presets
    half = ("model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=192")
    for op in ("direct_width", "direct_width:2"):
        cfg = presets.get("tiny").override({"growth.op": op, "growth.source_steps": 5,
                                            "growth.source": half})
        assert cfg.source_config().model.d_model == 64 and cfg.source_config().model.n_layers == 2
    with pytest.raises(ConfigError, match=r"^growth.op: 'direct_width:4' makes d_model 4 × 64"):
        presets.get("tiny").override({"growth.op": "direct_width:4", "growth.source_steps": 5,
                                      "growth.source": half})
