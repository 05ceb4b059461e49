"""Benchmark: the grouped-matmul kernel vs ``jax.lax.ragged_dot`` and a dense matmul of equal FLOPs.

Prints one JSON line per expert count E: forward and forward+backward TFLOP/s of the kernel
(``impl="pallas"``), their ratios to ``ragged_dot`` and to one dense ``[M, K] @ [K, N]`` matmul (the
same FLOPs; the issue's goal on a GPU: ≥ 0.8× dense at E = 8..64, and ≥ ragged_dot), measured in
the same process, and the kernel's largest error against ``ragged_dot``. Group sizes are a random
routing (multinomial over E, seeded), so group boundaries fall inside tiles.

    python experiments/bench_grouped_matmul.py                 # GPU/TPU: M 16k, K 2048, N 1408
    python experiments/bench_grouped_matmul.py --experts 8 64 --repeats 20

On CPU the kernel runs in Pallas's interpreter on small shapes: the numbers check the harness, not
the kernel's speed.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from bench_train import median_time  # experiments/ is on sys.path when a script runs

from pallas_kernels.grouped_matmul import grouped_matmul


def _programs(fn):
    """Jitted forward and forward+backward (value, d-lhs, d-rhs) of ``fn(lhs, rhs, sizes)``."""
    def fwd_bwd(lhs, rhs, sizes, dout):
        out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
        return out, *vjp(dout)

    return jax.jit(fn), jax.jit(fwd_bwd)


def _ratio(baseline_s: float, ours_s: float) -> float:
    """Baseline time over kernel time: > 1 means the kernel is faster."""
    return round(baseline_s / ours_s, 3)


def main() -> None:
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512 if on_cpu else 16384,
                        help="M: routed token-expert assignments")
    parser.add_argument("--k", type=int, default=128 if on_cpu else 2048, help="K (d_model)")
    parser.add_argument("--n", type=int, default=256 if on_cpu else 1408, help="N (d_expert)")
    parser.add_argument("--experts", type=int, nargs="+", default=[8] if on_cpu else [8, 16, 64])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3 if on_cpu else 20)
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    M, K, N = args.rows, args.k, args.n
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    lhs = jax.random.normal(keys[0], (M, K), dtype)
    dout = jax.random.normal(keys[2], (M, N), dtype)
    dense_w = jax.random.normal(keys[1], (K, N), dtype)
    flops_fwd = 2 * M * K * N
    dense_fwd, dense_fwd_bwd = _programs(lambda a, b, s: a @ b)
    dense = {"fwd_s": median_time(dense_fwd, lhs, dense_w, None, repeats=args.repeats),
             "fwd_bwd_s": median_time(dense_fwd_bwd, lhs, dense_w, None, dout,
                                      repeats=args.repeats)}
    for E in args.experts:
        rhs = jax.random.normal(keys[1], (E, K, N), dtype)
        sizes = jnp.asarray(np.random.default_rng(E).multinomial(M, np.ones(E) / E), jnp.int32)
        runs = {}
        for name, impl in (("kernel", "pallas"), ("ragged_dot", "xla")):
            fwd, fwd_bwd = _programs(lambda a, b, s, impl=impl: grouped_matmul(a, b, s, impl=impl))
            runs[name] = {"fwd_s": median_time(fwd, lhs, rhs, sizes, repeats=args.repeats),
                          "fwd_bwd_s": median_time(fwd_bwd, lhs, rhs, sizes, dout,
                                                   repeats=args.repeats),
                          "outputs": fwd_bwd(lhs, rhs, sizes, dout)}
        ours, base = runs["kernel"], runs["ragged_dot"]
        err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                  for a, b in zip(ours["outputs"], base["outputs"], strict=True))
        row = {
            "bench": "grouped_matmul", "device": jax.devices()[0].device_kind, "backend": backend,
            "interpret": on_cpu, "dtype": args.dtype, "M": M, "K": K, "N": N, "E": E,
            "fwd_tflops": round(flops_fwd / ours["fwd_s"] / 1e12, 4),
            "fwd_bwd_tflops": round(3 * flops_fwd / ours["fwd_bwd_s"] / 1e12, 4),
            "fwd_ratio_to_ragged_dot": _ratio(base["fwd_s"], ours["fwd_s"]),
            "fwd_bwd_ratio_to_ragged_dot": _ratio(base["fwd_bwd_s"], ours["fwd_bwd_s"]),
            "fwd_ratio_to_dense": _ratio(dense["fwd_s"], ours["fwd_s"]),
            "fwd_bwd_ratio_to_dense": _ratio(dense["fwd_bwd_s"], ours["fwd_bwd_s"]),
            "max_abs_err_vs_ragged_dot": err,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
