"""Benchmark: the train step on several mesh layouts vs one device, measured in the same process.

Prints one JSON line per layout: step time, tokens/s and its ratio to the one-device step, and the
largest per-device bytes of parameters + optimizer state as a ratio to the unsharded size (≈ 1/fsdp
under FSDP, 1/(fsdp·tensor) for the tensor-sharded weights). The first line is the one-device
baseline itself.

    python experiments/bench_sharding.py                      # all devices: data, fsdp, combined
    python experiments/bench_sharding.py --cpu-devices 8      # 8 fake CPU devices (sets XLA_FLAGS)
    python experiments/bench_sharding.py --preset small --layout data=2,fsdp=2,tensor=2

On fake CPU devices the times only show the overhead of the collectives (all "devices" share the same
cores); the byte ratios are real.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--layout", dest="layouts", action="append", default=None,
                        metavar="AXIS=N,...", help="mesh layout, e.g. fsdp=8 (repeatable; default: "
                        "data=all, fsdp=all, and data=2,fsdp=all/4,tensor=2 when it divides)")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="run on this many fake CPU devices (must come before JAX starts)")
    return parser.parse_args()


def _default_layouts(n: int) -> list[str]:
    layouts = [f"data={n}", f"fsdp={n}"]
    if n % 8 == 0:
        layouts.append(f"data=2,fsdp={n // 4},tensor=2")
    return layouts if n > 1 else []


def _per_device_bytes(tree) -> int:
    """The largest total, over devices, of the shards of ``tree``'s arrays held on one device."""
    import jax
    per_device: dict = defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    return max(per_device.values())


def main() -> None:
    args = _parse_args()
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from bench_train import time_steps  # experiments/ is on sys.path when a script runs

    import jscale
    from jscale import mesh, optim
    from jscale.config import ConfigError, parse_overrides
    from jscale.train import make_init_state, make_layout, make_train_step

    base = jscale.presets.get(args.preset).override(parse_overrides(args.overrides))
    tc = base.train
    rng = np.random.default_rng(0)
    host_batch = {k: rng.integers(0, base.model.vocab_size, (tc.batch_size, tc.seq_len)
                                  ).astype(np.int32) for k in ("inputs", "targets")}
    n = jax.device_count()
    layouts = args.layouts if args.layouts is not None else _default_layouts(n)
    baseline_s = None
    for spec in ["single"] + layouts:
        overrides = {} if spec == "single" else {
            f"mesh.{k}": int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
        try:
            cfg = base.override(overrides)
            layout = make_layout(cfg)
        except ConfigError as e:
            print(f"bench_sharding: skipping {spec}: {e}", file=sys.stderr)
            continue
        optimizer = optim.make_optimizer(cfg.optim, tc.steps)
        state = make_init_state(cfg, optimizer, layout)()
        step = make_train_step(cfg, optimizer, layout)
        batch = (host_batch if layout is None else
                 {k: mesh.put_global(v, layout.batch_sharding()) for k, v in host_batch.items()})
        state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
        device_bytes = _per_device_bytes((state.params, state.opt_state))
        state, step_s = time_steps(step, state, batch, args.steps)
        m = step(state, batch)[1]  # the loss, to show every layout computes the same
        baseline_s = baseline_s or step_s
        print(json.dumps({
            "bench": "sharding", "layout": spec, "preset": args.preset,
            "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "n_devices_used": 1 if layout is None else layout.mesh.size,
            "batch_size": tc.batch_size, "seq_len": tc.seq_len,
            "step_s": round(step_s, 5), "tokens_per_s": round(tc.batch_size * tc.seq_len / step_s, 1),
            "speed_vs_single": round(baseline_s / step_s, 3),
            "param_opt_bytes_unsharded": state_bytes, "param_opt_bytes_per_device": device_bytes,
            "bytes_ratio": round(device_bytes / state_bytes, 4),
            "loss": float(m["loss"])}), flush=True)


if __name__ == "__main__":
    main()
