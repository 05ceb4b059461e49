"""Benchmark: 8 runs of one shape (learning rate × seed) under each sweep strategy.

Prints one JSON line: wall time of ``sequential``, ``vmap`` and ``auto`` (its probe included), each
strategy's speed-up over ``sequential`` (sequential wall time / its wall time; > 1 is faster), the
compile time of each strategy's step program, and the device.

    python experiments/bench_sweep.py [--preset tiny] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

import jscale
from jscale import sweep
from jscale.sweep import group as group_lib


def compile_seconds(runs, strategy: str) -> float:
    """Time to lower and compile the group's step program for ``strategy``."""
    common = group_lib.signature(runs[0])
    progs = group_lib.build_programs(common, strategy, None)
    R = len(runs) if strategy == "vmap" else 1
    state, alive = progs.init(group_lib._member_data(runs[:R]))
    tc = common.train
    batch = {k: np.zeros((R, tc.batch_size, tc.seq_len), np.int32)
             for k in ("inputs", "targets", "segment_ids")}
    t0 = time.perf_counter()
    progs.step.lower(state, alive, batch, np.ones(R, bool)).compile()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    base = jscale.presets.get(args.preset).override({
        "train.steps": args.steps, "train.log_every": args.steps, "train.eval_every": args.steps,
        "train.eval_batches": 1, "optim.warmup_steps": min(10, args.steps // 3)})
    runs = sweep.product(base, **{"optim.lr": [1e-3, 2e-3, 4e-3, 8e-3], "train.seed": [0, 1]})

    walls, strategies = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JSCALE_CACHE"] = os.path.join(tmp, "cache")  # auto must really probe
        for strategy in ("sequential", "vmap", "auto"):
            t0 = time.perf_counter()
            df = sweep.run(runs, os.path.join(tmp, strategy), strategy=strategy, progress=False)
            walls[strategy] = time.perf_counter() - t0
            strategies[strategy] = sorted(set(df["strategy"]))
    print(json.dumps({
        "bench": "sweep", "preset": args.preset, "runs": len(runs), "steps": args.steps,
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "wall_s": {k: round(v, 2) for k, v in walls.items()},
        "speedup_vs_sequential": {k: round(walls["sequential"] / v, 3) for k, v in walls.items()},
        "auto_chose": strategies["auto"],
        "compile_s": {s: round(compile_seconds(runs, s), 2) for s in ("sequential", "vmap")},
    }))


if __name__ == "__main__":
    main()
