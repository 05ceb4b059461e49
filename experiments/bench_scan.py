"""Benchmark the selective scan: Pallas kernel vs lax.scan reference vs chunked associative scan.

Prints one JSON line per (T, direction): median seconds of each implementation, the kernel's
speed-up over both, and the kernel's achieved bytes/s (its minimal HBM traffic: every input read
once, every output written once, plus the saved chunk-start states) with its fraction of the
device's HBM bandwidth when known. Inputs are ``--dtype`` (bf16 by default); the state is float32.

    python experiments/bench_scan.py                       # GPU/TPU: T 2k-8k, D 2048, N 16, B 4
    python experiments/bench_scan.py --T 256 --D 64 --B 2  # CPU smoke run (kernel interpreted)

Absolute times mean something only on an accelerator; on CPU the kernel runs in interpret mode.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from bench_train import median_time  # experiments/ is on sys.path when a script runs

from pallas_kernels.selective_scan import kernel as scan_kernel
from pallas_kernels.selective_scan import selective_scan, selective_scan_chunked, selective_scan_ref

#: HBM bandwidth (bytes/s) by device kind, for the bandwidth fraction.
HBM_BYTES_PER_S = {"NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H200": 4.8e12, "TPU v5 lite": 8.19e11,
                   "TPU v5p": 2.765e12, "TPU v6 lite": 1.64e12, "TPU v4": 1.2e12}


def _inputs(b, t, d, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = {"u": rng.standard_normal((b, t, d)), "delta": 0.5 * rng.standard_normal((b, t, d)),
         "z": rng.standard_normal((b, t, d)), "B": rng.standard_normal((b, t, n)),
         "C": rng.standard_normal((b, t, n))}
    x = {k: jnp.asarray(v, dtype) for k, v in x.items()}
    x["A"] = -jnp.asarray(np.broadcast_to(np.arange(1, n + 1), (d, n)), jnp.float32)
    x["D"] = jnp.ones((d,), jnp.float32)
    x["delta_bias"] = jnp.asarray(rng.uniform(-4, -2, (d,)), jnp.float32)
    return x


def _fn(impl: str, backward: bool):
    def run(x):
        args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
        kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
        if impl == "kernel":
            return selective_scan(*args, **kw, impl="pallas")
        if impl == "reference":
            return selective_scan_ref(*args, **kw)
        return selective_scan_chunked(*args, **kw)

    if not backward:
        return jax.jit(run)
    return jax.jit(jax.grad(lambda x: jnp.sum(run(x).astype(jnp.float32))))


def _kernel_bytes(b, t, d, n, itemsize, backward):
    """Minimal HBM traffic of the kernel(s): inputs read once, outputs written once."""
    backend = {"gpu": "mosaic_gpu", "tpu": "tpu"}.get(jax.default_backend(), "interpret")
    chunk = scan_kernel.DEFAULTS[backend][0]
    chan, stat = b * t * d * itemsize, b * t * n * itemsize
    states = b * -(-t // chunk) * d * n * 4
    forward = 3 * chan + 2 * stat + chan + states            # u, Δ, z, B, C -> out, chunk states
    if not backward:
        return forward
    # backward: dout, u, Δ, z, B, C, states -> du, dΔ, dz, dB/dC partials (per channel block)
    blocks = -(-d // scan_kernel.DEFAULTS[backend][1])
    return forward + 4 * chan + 2 * stat + states + 3 * chan + 2 * blocks * b * t * n * 4


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--D", type=int, default=2048)
    parser.add_argument("--N", type=int, default=16)
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-reference", action="store_true",
                        help="skip the lax.scan reference (slow at long T)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    peak = HBM_BYTES_PER_S.get(device.device_kind)
    dtype = jnp.dtype(args.dtype)
    for t in args.T:
        x = _inputs(args.B, t, args.D, args.N, dtype)
        for backward in (False, True):
            times = {impl: median_time(_fn(impl, backward), x, repeats=args.repeats)
                     for impl in ("kernel", "reference", "associative")
                     if not (impl == "reference" and args.skip_reference)}
            nbytes = _kernel_bytes(args.B, t, args.D, args.N, dtype.itemsize, backward)
            row = {"bench": "selective_scan", "device": device.device_kind,
                   "platform": jax.default_backend(), "direction": "fwd+bwd" if backward else "fwd",
                   "B": args.B, "T": t, "D": args.D, "N": args.N, "dtype": args.dtype,
                   **{f"{k}_s": v for k, v in times.items()},
                   **{f"speedup_vs_{k}": v / times["kernel"] for k, v in times.items()
                      if k != "kernel"},
                   "kernel_bytes_per_s": nbytes / times["kernel"],
                   "kernel_hbm_fraction": nbytes / times["kernel"] / peak if peak else None}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
