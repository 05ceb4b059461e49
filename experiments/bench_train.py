"""Benchmark: the train step of a preset vs this device's matmul peak, measured in the same process.

Prints one JSON line: tokens/s and achieved model FLOP/s (``flops_per_token(...)["training"]``) of the
preset's jitted train step on synthetic batches, the peak FLOP/s of a large square ``jnp.dot`` in the
same dtype, and their ratio (an MFU against the *measured* peak, not a datasheet).

    python experiments/bench_train.py [--preset small] [--steps 20] [--set model.dtype=bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import jscale
from jscale import optim
from jscale.config import parse_overrides
from jscale.train import init_state, make_train_step


def median_time(fn, *args, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` over ``repeats`` calls, after one call to compile and warm up.
    Shared by the benchmarks (``experiments/`` is on ``sys.path`` when a script runs)."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_steps(step, state, batch, n_steps: int):
    """Run ``step`` once (compile, warm up), then time ``n_steps`` more: ``(state, seconds/step)``."""
    state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return state, (time.perf_counter() - t0) / n_steps


def matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of an ``n×n @ n×n`` ``jnp.dot`` in ``dtype`` (median of ``repeats``)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.dtype(dtype))
    return 2 * n**3 / median_time(jax.jit(jnp.dot), a, b, repeats=repeats)


def train_step_seconds(cfg, n_steps: int) -> float:
    """Seconds per jitted train step of ``cfg`` on a random (one-document) batch, after one
    compiling step. Shared by the benchmarks."""
    tc = cfg.train
    optimizer = optim.make_optimizer(cfg.optim, tc.steps)
    step = make_train_step(cfg, optimizer)
    state = init_state(cfg, optimizer)
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.integers(0, cfg.model.vocab_size, (tc.batch_size, tc.seq_len)),
                            jnp.int32) for k in ("inputs", "targets")}
    batch["segment_ids"] = jnp.ones((tc.batch_size, tc.seq_len), jnp.int32)
    _, s = time_steps(step, state, batch, n_steps)
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--matmul-n", type=int, default=None,
                        help="peak matmul size (default 2048 on CPU, 8192 on accelerators)")
    args = parser.parse_args()

    cfg = jscale.presets.get(args.preset).override(parse_overrides(args.overrides))
    tc = cfg.train
    step_s = train_step_seconds(cfg, args.steps)

    backend = jax.default_backend()
    n = args.matmul_n or (2048 if backend == "cpu" else 8192)
    peak = matmul_peak(cfg.model.dtype, n)
    tokens_per_s = tc.batch_size * tc.seq_len / step_s
    flops_per_s = tokens_per_s * jscale.flops_per_token(cfg.model, tc.seq_len)["training"]
    print(json.dumps({
        "bench": "train_step", "preset": args.preset, "device": jax.devices()[0].device_kind,
        "backend": backend, "n_devices_used": 1, "dtype": cfg.model.dtype,
        "n_params": jscale.count_params(cfg.model)["total"], "batch_size": tc.batch_size,
        "seq_len": tc.seq_len, "step_s": round(step_s, 5), "tokens_per_s": round(tokens_per_s, 1),
        "model_flops_per_s": round(flops_per_s, 1), "matmul_peak_flops_per_s": round(peak, 1),
        "matmul_n": n, "ratio_to_matmul_peak": round(flops_per_s / peak, 4),
    }))


if __name__ == "__main__":
    main()
