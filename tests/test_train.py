"""Training end to end: the CLI, outputs, divergence, schedules, exact resume after SIGKILL, aux
metrics and model state through the core, and starting from given parameters."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    STATE_LEAF,
    STATE_METRIC,
    cli_popen,
    env,
    finish,
    kill_mid_training,
    metrics_rows,
    micro_cfg,
    patch_stateful_forward,
    train_args,
)
from tolerances import F32_FORMULA_RTOL

import jscale
from jscale import optim
from jscale.cli import main as cli_main
from jscale.config import ConfigError
from jscale.train import load_state, train

# A very small run (a few seconds of compute) used everywhere below.
MICRO = ["model.d_model=32", "model.n_layers=2", "model.d_ff=64", "model.n_heads=2",
         "model.n_kv_heads=1", "train.seq_len=32", "train.batch_size=4", "train.steps=24",
         "train.log_every=4", "train.eval_every=12", "train.eval_batches=2",
         "train.checkpoint_every=8", "optim.warmup_steps=4"]


def _micro_cfg(**extra):
    return micro_cfg(MICRO, **extra)


def _train_args(out: Path, *extra: str) -> list[str]:
    """``jscale train`` arguments (after the program name) for the MICRO run into ``out``."""
    return train_args(out, MICRO, *extra)


def _cli(out: Path, *extra: str):
    return cli_popen(_train_args(out, *extra))



@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted CLI run that every resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("reference")
    assert cli_main(_train_args(out)) == 0  # in this process; the resumed runs are subprocesses
    return out


@pytest.mark.slow
def test_cli_run_writes_outputs(reference_run):
    cfg = json.loads((reference_run / "config.json").read_text())
    assert cfg["model"]["d_model"] == 32 and cfg["train"]["steps"] == 24
    rows = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "wall_time_s"):
        assert key in rows[-1]
    assert [r["step"] for r in rows if "eval_loss" in r] == [12, 24]
    assert rows[-1]["tokens"] == 24 * 4 * 32
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["final_eval_loss"] == rows[-1]["eval_loss"]
    assert summary["eval_tokens"] == 2 * 4 * 32  # eval_batches × batch × seq_len, all distinct
    assert summary["diverged"] is False and summary["tokens"] == 24 * 4 * 32
    cfg = _micro_cfg()
    assert summary["n_params"] == jscale.count_params(cfg.model)["total"]
    assert summary["flops"] == pytest.approx(
        jscale.flops_per_token(cfg.model, 32)["training"] * 24 * 4 * 32)
    corpus = jscale.data.load_corpus(cfg.data, 257, 32)
    assert summary["epochs"] == pytest.approx(24 * 4 * 32 / len(corpus.train_tokens))
    assert sorted(os.listdir(reference_run / "checkpoints")) == ["16", "24"]  # keep_checkpoints=2




@pytest.mark.slow
def test_resume_after_sigkill_during_training(reference_run, tmp_path):
    out = tmp_path / "killed"
    # kill once it is past the first checkpoint, mid-training
    kill_mid_training(_train_args(out), out, after_step=12)
    finish(_cli(out))  # the same command resumes
    assert metrics_rows(out) == metrics_rows(reference_run)
    assert (json.loads((out / "summary.json").read_text())["final_train_loss"] ==
            json.loads((reference_run / "summary.json").read_text())["final_train_loss"])


KILL_IN_CHECKPOINT_WRITE = """
import os, signal, sys
import grain._src.python.checkpoint.handler as h
original = h.CheckpointHandler.save
calls = []
def save_then_die(self, *args, **kwargs):
    calls.append(1)
    original(self, *args, **kwargs)
    if len(calls) == 2:  # the second checkpoint (step 16): die with its files half written
        os.kill(os.getpid(), signal.SIGKILL)
h.CheckpointHandler.save = save_then_die
from jscale.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_sigkill_during_checkpoint_write(reference_run, tmp_path):
    out = tmp_path / "killed_in_ckpt"
    args = _train_args(out)
    proc = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT_WRITE, *args], env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    from jscale.checkpoint import Checkpointer
    assert Checkpointer(out / "checkpoints").latest_step() == 8  # 16 is incomplete: not restorable
    finish(_cli(out))
    assert metrics_rows(out) == metrics_rows(reference_run)


@pytest.mark.slow
def test_rerun_of_finished_run_is_a_no_op(reference_run):
    before = (reference_run / "metrics.jsonl").read_text()
    assert cli_main(_train_args(reference_run)) == 0
    assert (reference_run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_rerun_with_different_config_is_refused(reference_run, capsys):
    capsys.readouterr()
    assert cli_main(_train_args(reference_run, "optim.lr=0.1")) == 2
    err = capsys.readouterr().err
    assert "different config (optim.lr: 0.003 -> 0.1)" in err and len(err.strip().splitlines()) == 1


BAD_ARGUMENTS = [
    (["train", "--preset", "nope", "--out", "x"], "unknown preset 'nope'"),
    (["train", "--preset", "tiny", "--out", "x", "--set", "optim.nope=1"], "unknown config key"),
    (["train", "--preset", "tiny", "--out", "x", "--set", "train.steps=abc"], "train.steps: must be"),
    (["train", "--preset", "tiny"], "the following arguments are required: --out"),
    (["fly"], "invalid choice: 'fly'"),
    (["train", "--preset", "tiny", "--out", "x", "--set", "data.path=/does/not/exist.txt"],
     "data.path"),
]


@pytest.mark.parametrize("argv, match", BAD_ARGUMENTS)
def test_cli_bad_arguments_exit_2_with_one_line(argv, match, tmp_path, monkeypatch, capsys):
    """In this process: ``main`` returns (or argparse exits with) 2 and prints one line."""
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert match in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_cli_bad_argument_exits_2_with_one_line_from_a_fresh_process(tmp_path):
    """The same as a command: ``python -m jscale.cli`` exits 2 and its whole stderr is one line
    (nothing else, e.g. a warning at import, reaches it) for the case that gets furthest (the
    config is built, the corpus looked for)."""
    argv, match = BAD_ARGUMENTS[-1]
    proc = subprocess.run([sys.executable, "-m", "jscale.cli", *argv], env=env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert match in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_presets_and_help():
    assert cli_main(["presets"]) == 0
    for argv in (["--help"], ["train", "--help"], ["presets", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 0


@pytest.mark.slow
def test_divergence_stops_cleanly(tmp_path):
    cfg = _micro_cfg(**{"optim.lr": 1e30, "optim.grad_clip": 0.0, "optim.warmup_steps": 0})
    summary = train(cfg, tmp_path, quiet=True)
    assert summary["diverged"] is True and 1 <= summary["diverged_step"] <= 4
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"] is True


FINITE_BLOWUP = {"optim.lr": 30.0, "train.steps": 6, "train.log_every": 1, "train.eval_every": 0,
                 "train.checkpoint_every": 0}


@pytest.mark.slow
def test_finite_loss_far_above_uniform_is_divergence(tmp_path):
    # lr = 30: the loss stays finite but jumps from ~ln 257 to thousands at step 2.
    summary = train(_micro_cfg(**FINITE_BLOWUP), tmp_path / "default", quiet=True)
    assert summary["diverged"] is True and summary["diverged_step"] == 2
    assert summary["final_eval_loss"] is None and summary["final_train_loss"] is None
    assert _micro_cfg().divergence_threshold == pytest.approx(3 * np.log(257))
    # the threshold is configurable; inf counts only NaN/inf (the run then goes on, finite)
    summary = train(_micro_cfg(**FINITE_BLOWUP, **{"train.divergence_loss": float("inf")}),
                    tmp_path / "inf", quiet=True)
    assert summary["diverged"] is False and summary["final_train_loss"] > 3 * np.log(257)
    with pytest.raises(jscale.ConfigError, match="train.divergence_loss"):
        _micro_cfg(**{"train.divergence_loss": 0.0})


@pytest.mark.slow
def test_final_train_loss_is_the_mean_of_the_last_steps(tmp_path):
    from jscale.records import FINAL_LOSS_STEPS
    every = train(_micro_cfg(**{"train.log_every": 1}), tmp_path / "every", quiet=True)
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 24
    expected = np.mean(losses[-FINAL_LOSS_STEPS:])
    assert every["final_train_loss"] == pytest.approx(expected, rel=1e-6)
    sparse = train(_micro_cfg(**{"train.log_every": 12}), tmp_path / "sparse", quiet=True)
    assert sparse["final_train_loss"] == pytest.approx(expected, rel=1e-6)  # not the rows' mean


@pytest.mark.slow
def test_epochs_are_recorded_warned_and_limited(tmp_path):
    # ~2,500 training tokens: 24 steps × 4 × 32 tokens is 1.2 epochs; 150 steps is 7.6 epochs.
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "scaling laws " * 12 for i in range(16)))
    cfg = _micro_cfg(**{"data.path": str(corpus), "train.eval_every": 0,
                        "train.checkpoint_every": 0, "train.eval_batches": 1})
    summary = train(cfg, tmp_path / "a", quiet=True)
    assert 1 < summary["epochs"] < 4
    with pytest.warns(UserWarning, match="epochs"):
        train(cfg.override({"train.steps": 150}), tmp_path / "b", quiet=True)
    with pytest.raises(jscale.ConfigError, match="data.max_epochs"):
        train(cfg.override({"train.steps": 150, "data.max_epochs": 6.0}), tmp_path / "c",
              quiet=True)
    assert not (tmp_path / "c" / "checkpoints").exists()  # refused before training


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    cfg = jscale.OptimConfig(lr=1.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1,
                             decay_fraction=0.2)
    opt = optim.make_optimizer(cfg, total_steps=100)
    state = opt.init({"w_DD": jnp.zeros((2, 2))})
    lrs = np.array([optim.current_lr(state, s, cfg) for s in range(100)])
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10, rtol=F32_FORMULA_RTOL)
    if schedule == "constant":
        np.testing.assert_allclose(lrs[10:], 1.0)
    elif schedule == "cosine":
        assert np.all(np.diff(lrs[10:]) <= 0) and lrs[-1] == pytest.approx(0.1)
    else:  # wsd: flat until the last 20 steps, then linear to 0.1
        np.testing.assert_allclose(lrs[10:80], 1.0)
        np.testing.assert_allclose(lrs[80:], 1 - 0.9 * np.arange(1, 21) / 20, rtol=F32_FORMULA_RTOL)


def test_weight_decay_mask_and_injected_hyperparams():
    params = jscale.init(jax.random.PRNGKey(0), _micro_cfg().model)
    mask = optim.decay_mask(params, decay_embeddings=False)
    assert mask["layers"]["attn"]["w_q_LDHK"] and mask["layers"]["mlp"]["w_down_LFD"]
    assert not mask["layers"]["attn_norm"]["scale_LD"] and not mask["final_norm"]["scale_D"]
    assert not mask["embed"]["table_VD"]
    assert optim.decay_mask(params, decay_embeddings=True)["embed"]["table_VD"]

    # With zero gradients, AdamW's update is pure decay: only masked leaves move.
    cfg = jscale.OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant")
    opt = optim.make_optimizer(cfg, total_steps=10)
    state = opt.init(params)
    assert set(state.hyperparams) >= {"learning_rate", "weight_decay"}  # injectable for sweeps
    updates, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    assert np.any(updates["layers"]["attn"]["w_q_LDHK"] != 0)
    assert np.all(updates["layers"]["attn_norm"]["scale_LD"] == 0)
    assert np.all(updates["embed"]["table_VD"] == 0)


@pytest.mark.slow
def test_no_recompilation_after_first_step(tmp_path, monkeypatch):
    from jscale import core
    traces = []
    original = core.train_step

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(core, "train_step", counting)
    summary = train(_micro_cfg(**{"train.steps": 10, "train.checkpoint_every": 5}), tmp_path,
                    quiet=True)
    assert summary["steps"] == 10 and len(traces) == 1


def _drop_checkpoint(src: Path, dst: Path, step: int) -> Path:
    """A copy of the run in ``src`` as if killed after its checkpoint before ``step``: checkpoint
    ``step`` and the summary removed."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / str(step))
    (dst / "summary.json").unlink()
    return dst


@pytest.mark.slow
def test_start_from_another_runs_params_and_resume(reference_run, tmp_path):
    """``train(..., init_params=)``: a run started from the reference run's final parameters begins
    near that run's final loss, far below a fresh init's first loss; its own checkpoints resume it
    exactly; parameters of another shape are refused before training."""
    cfg = _micro_cfg()
    trained = load_state(cfg, reference_run)
    assert int(trained.step) == 24
    first = metrics_rows(reference_run)  # a fresh init of the same config
    final = json.loads((reference_run / "summary.json").read_text())["final_train_loss"]
    summary = train(cfg, tmp_path / "warm", quiet=True, init_params=trained.params)
    warm = metrics_rows(tmp_path / "warm")
    assert abs(warm[0]["loss"] - final) < 0.25 < first[0]["loss"] - final
    assert warm[0]["loss"] != first[0]["loss"] and summary["final_train_loss"] < final
    assert not any(x.is_deleted() for x in jax.tree.leaves(trained.params))  # not donated
    resumed = _drop_checkpoint(tmp_path / "warm", tmp_path / "resumed", 24)
    again = train(cfg, resumed, quiet=True, init_params=trained.params)
    assert metrics_rows(resumed) == warm and again["final_train_loss"] == summary["final_train_loss"]
    wrong = jax.tree.map(lambda x: x[..., :1], trained.params)
    with pytest.raises(ConfigError, match=r"init_params: \['embed'\]\['table_VD'\] is float32"):
        train(cfg, tmp_path / "wrong", quiet=True, init_params=wrong)


@pytest.mark.slow
def test_aux_metrics_and_model_state_through_training_and_checkpoints(tmp_path, monkeypatch):
    """Every aux value a family reports reaches metrics.jsonl; its non-gradient model state is
    updated every step, checkpointed, and restored bitwise on resume."""
    patch_stateful_forward(monkeypatch)
    cfg = _micro_cfg()
    train(cfg, tmp_path / "run", quiet=True)
    rows = metrics_rows(tmp_path / "run")
    assert [r[STATE_METRIC] for r in rows] == [r["step"] - 1 for r in rows]  # the state it was given
    assert all(np.isfinite(r["logit_mean"]) for r in rows) and "ce_loss" not in rows[0]
    for step in (16, 24):
        state = load_state(cfg, tmp_path / "run", step)
        assert int(state.model_state[STATE_LEAF]) == step == int(state.step)
    resumed = _drop_checkpoint(tmp_path / "run", tmp_path / "resumed", 24)
    train(cfg, resumed, quiet=True)
    assert metrics_rows(resumed) == rows
    jax.tree.map(np.testing.assert_array_equal, load_state(cfg, resumed),
                 load_state(cfg, tmp_path / "run"))
