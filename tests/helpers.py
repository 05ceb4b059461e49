"""Shared test helpers: tiny run configs, invoking the ``jscale`` CLI (in process or as a
subprocess), reading a run's outputs, and a test-only stateful family behaviour (an aux metric and a
model-state counter patched into ``models.forward``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

import jscale
from jscale import models
from jscale.config import RunConfig, parse_overrides

ROOT = Path(__file__).resolve().parents[1]

#: Fields of a metrics row that legitimately differ between two runs of the same config.
TIMING = ("tokens_per_s", "wall_time_s")


def micro_cfg(overrides: Sequence[str], preset: str = "tiny", **extra) -> RunConfig:
    """``preset`` with the ``key=value`` ``overrides`` (then ``extra``, a dotted-key dict) applied."""
    return jscale.presets.get(preset).override(parse_overrides(list(overrides))).override(extra)


def env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: this checkout first on ``PYTHONPATH``."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra)
    return e


def xla_flags(devices: int) -> str:
    """This session's XLA_FLAGS with ``devices`` host devices instead of its 8 (for the processes of
    a multi-process test; the other flags, e.g. the optimization level, stay as the session's)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])


def train_args(out: Path, overrides: Sequence[str], *extra: str, preset: str = "tiny",
               quiet: bool = True) -> list[str]:
    """``jscale train`` arguments (after the program name) for ``overrides`` (+ ``extra``) into
    ``out``."""
    args = ["train", "--preset", preset, "--out", str(out)] + (["--quiet"] if quiet else [])
    for s in list(overrides) + list(extra):
        args += ["--set", s]
    return args


def cli_popen(args: Sequence[str], *, code: str | None = None, extra_env: dict | None = None,
              **popen_kw) -> subprocess.Popen:
    """``python -m jscale.cli ARGS`` (or ``python -c CODE ARGS``) as a subprocess, text pipes."""
    head = ["-c", code] if code is not None else ["-m", "jscale.cli"]
    popen_kw.setdefault("stdout", subprocess.PIPE)
    popen_kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, *head, *args], env=env(**(extra_env or {})),
                            text=True, **popen_kw)


def finish(proc: subprocess.Popen) -> None:
    """Wait for a CLI subprocess; fail with its stderr unless it exited 0."""
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


def metrics_rows(out: Path, *, timing: bool = False) -> list[dict]:
    """``out/metrics.jsonl``'s rows (without the :data:`TIMING` fields unless ``timing``)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows if timing else [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# ---------------------------------------------------------------------------------------------------
# a test-only stateful family behaviour


#: The aux metric and the model-state leaf :func:`patch_stateful_forward` adds.
STATE_METRIC, STATE_LEAF = "state_count", "count"


def patch_stateful_forward(monkeypatch) -> None:
    """Make every family report an extra aux metric and carry a non-gradient state: the model state
    is ``{"count": int32}`` (0 at init), each forward pass returns it incremented and reports
    ``state_count`` (the count it was given, as float32) and ``logit_mean`` in its aux."""
    forward = models.forward
    monkeypatch.setattr(models, "init_model_state",
                        lambda cfg: {STATE_LEAF: jnp.zeros((), jnp.int32)})

    def stateful(params, tokens_BT, cfg, *, segment_ids_BT=None, model_state=None, **kwargs):
        logits, aux, state = forward(params, tokens_BT, cfg, segment_ids_BT=segment_ids_BT,
                                     **kwargs)
        count = model_state[STATE_LEAF]
        aux = {**aux, STATE_METRIC: count.astype(jnp.float32), "logit_mean": logits.mean()}
        return logits, aux, {**state, STATE_LEAF: count + 1}
    monkeypatch.setattr(models, "forward", stateful)


#: A `jscale train` whose every step sleeps 0.1 s, so that a kill lands mid-training even on a
#: fast machine (run as `python -c SLOW_STEPS ARGS...`).
SLOW_STEPS = """
import sys, time
import jscale.train as t
make = t.make_train_step
def slow_make(*args):
    step = make(*args)
    def slow_step(state, batch):
        time.sleep(0.1)  # so the kill below surely lands mid-training, even on a fast machine
        return step(state, batch)
    return slow_step
t.make_train_step = slow_make
from jscale.cli import main
sys.exit(main(sys.argv[1:]))
"""


def kill_mid_training(args: Sequence[str], out: Path, after_step: int) -> None:
    """Run ``jscale ARGS`` with :data:`SLOW_STEPS` and SIGKILL it once ``out/metrics.jsonl`` has
    the row of ``after_step`` (pick a step past a checkpoint): the run must still be training then,
    and leaves no ``summary.json``."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *args], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists() and f'"step": {after_step},' in metrics.read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
