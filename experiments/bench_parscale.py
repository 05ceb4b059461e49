"""Benchmark: what P parallel streams cost — train-step time and batch-1 decode speed at P = 1, 2, 4, 8.

Prints one JSON line, every number measured in the same process: for each P, seconds per jitted
train step of the preset (default ``parscale-tiny``) with ``model.n_streams = P``, and batch-1 decode
tokens/s (median of jitted :func:`jscale.models.decode_step` calls after a prompt that fills the
cache and compiles), each with its ratio to P = 1 (``step_time_vs_p1``: > 1 is slower;
``decode_speed_vs_p1``: < 1 is slower). The analytic training FLOPs per token ratio is printed beside
them: on an accelerator at batch 1, P streams should cost far less than P× in latency (the weights
are read once for all streams); on a CPU this is a harness check.

    python experiments/bench_parscale.py                                  # CPU (~1 min)
    python experiments/bench_parscale.py --preset parscale-tiny --set model.d_model=1024 \\
        --set model.n_heads=16 --set model.n_kv_heads=4 --set model.n_layers=12 \\
        --set model.d_ff=3072 --set train.batch_size=16 --set train.seq_len=1024 --steps 20   # GPU
"""

from __future__ import annotations

import argparse
import json

import jax
from bench_train import train_step_seconds  # experiments/ is on sys.path when a script runs
from parscale_law import measure_decode

import jscale
from jscale import models
from jscale.config import parse_overrides


def decode_tokens_per_s(model_cfg, prompt: int, tokens: int) -> float:
    """Batch-1 greedy decode speed of ``model_cfg`` (random weights): tokens/s of the median step
    (experiments/parscale_law.py's measurement)."""
    return 1.0 / measure_decode(model_cfg, prompt_tokens=prompt, decode_tokens=tokens)["latency_s"]


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="parscale-tiny")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=3 if on_cpu else 20, help="timed train steps")
    ap.add_argument("--prompt", type=int, default=16 if on_cpu else 128,
                    help="decode steps before timing (cache fill, compile)")
    ap.add_argument("--decode-tokens", type=int, default=16 if on_cpu else 128,
                    help="timed decode steps")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="override on the preset (e.g. model.d_model=256)")
    args = ap.parse_args()
    if 1 not in args.streams:
        ap.error("--streams: must include 1 (the baseline every ratio is against)")
    base = jscale.presets.get(args.preset).override(parse_overrides(args.overrides))
    rows = {}
    for P in sorted(args.streams):
        cfg = base.override({"model.n_streams": P})
        rows[P] = {"P": P, "step_s": train_step_seconds(cfg, args.steps),
                   "decode_tokens_per_s": decode_tokens_per_s(cfg.model, args.prompt,
                                                              args.decode_tokens),
                   "training_flops_per_token": models.flops_per_token(
                       cfg.model, cfg.train.seq_len)["training"],
                   "n_params": models.count_params(cfg.model)["total"]}
    ref = rows[1]
    out = []
    for r in rows.values():
        out.append({**{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()},
                    "step_time_vs_p1": round(r["step_s"] / ref["step_s"], 3),
                    "decode_speed_vs_p1": round(r["decode_tokens_per_s"]
                                                / ref["decode_tokens_per_s"], 3),
                    "flops_vs_p1": round(r["training_flops_per_token"]
                                         / ref["training_flops_per_token"], 3)})
    print(json.dumps({"bench": "parscale", "device": jax.devices()[0].device_kind,
                      "backend": jax.default_backend(), "preset": args.preset,
                      "batch_size": base.train.batch_size, "seq_len": base.train.seq_len,
                      "streams": out}))


if __name__ == "__main__":
    main()
