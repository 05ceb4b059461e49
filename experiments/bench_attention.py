"""Benchmark: the flash-attention kernel vs ``jax.nn.dot_product_attention`` and the reference.

Prints one JSON line per case (sequence length × head dim): forward and forward+backward TFLOP/s in
FlashAttention's convention (``4·B·H·T·S·K`` per forward, halved when causal; forward+backward is
3.5× the forward), their ratios to ``jax.nn.dot_product_attention`` (``implementation="cudnn"`` on
GPU, XLA elsewhere) and to the pure-jnp reference measured in the same process (ratio > 1: the
kernel is faster), the peak memory of each compiled forward+backward program from XLA's memory
analysis, and the kernel's largest error against the reference. A baseline that fails (e.g. out of
memory) is reported as null.

    python experiments/bench_attention.py                        # GPU/TPU: T 1k..16k, K 64 and 128
    python experiments/bench_attention.py --seq-lens 4096 --head-dims 128 --repeats 20

On CPU the kernel runs in Pallas's interpreter on small shapes: the numbers check the harness, not
the kernel's speed. Defaults follow FlashAttention's benchmarks: 16k tokens per batch
(``B = 16384 // T``), model width 2048 (``H = 2048 // K``), bf16, causal.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from bench_train import median_time  # experiments/ is on sys.path when a script runs

from pallas_kernels.flash_attention import attention_reference, flash_attention


def _peak_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries - aliased bytes of a compiled program (XLA's buffer
    assignment; ``peak_memory_in_bytes`` is not filled in on every backend)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _programs(attn, causal: bool):
    """Jitted forward and forward+backward (value and the three gradients) of ``attn``."""
    def fwd(q, k, v):
        return attn(q, k, v, causal)

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(fwd, q, k, v)
        return out, *vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def _measure(attn, args, causal: bool, repeats: int) -> dict:
    """Times (s) and peak bytes of one implementation; ``None`` entries where it fails."""
    fwd, fwd_bwd = _programs(attn, causal)
    q, k, v, do = args
    result = {"fwd_s": None, "fwd_bwd_s": None, "peak_bytes": None, "outputs": None}
    try:
        compiled = fwd_bwd.lower(q, k, v, do).compile()
        result["peak_bytes"] = _peak_bytes(compiled)
        result["fwd_s"] = median_time(fwd, q, k, v, repeats=repeats)
        result["fwd_bwd_s"] = median_time(compiled, q, k, v, do, repeats=repeats)
        result["outputs"] = compiled(q, k, v, do)
    except Exception as e:  # noqa: BLE001 — a baseline out of memory is a result, not a crash
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return result


def _tflops(seconds: float | None, flops: float) -> float | None:
    return None if seconds is None else round(flops / seconds / 1e12, 4)


def _ratio(baseline_s: float | None, ours_s: float | None) -> float | None:
    """Baseline time over kernel time: > 1 means the kernel is faster."""
    return None if baseline_s is None or ours_s is None else round(baseline_s / ours_s, 3)


def main() -> None:
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+",
                        default=[128, 256] if on_cpu else [1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tokens", type=int, default=512 if on_cpu else 16384,
                        help="tokens per batch: B = tokens // T (at least 1)")
    parser.add_argument("--d-model", type=int, default=256 if on_cpu else 2048,
                        help="query heads H = d_model // K")
    parser.add_argument("--kv-ratio", type=int, default=1, help="H // G (grouped-query attention)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--block-q", type=int, default=None)
    parser.add_argument("--block-k", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3 if on_cpu else 10)
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    dpa_impl = "cudnn" if backend == "gpu" else "xla"

    def kernel(q, k, v, causal):
        return flash_attention(q, k, v, causal=causal, impl="pallas", block_q=args.block_q,
                               block_k=args.block_k)

    def dpa(q, k, v, causal):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=dpa_impl)

    def reference(q, k, v, causal):
        return attention_reference(q, k, v, causal=causal)

    for K in args.head_dims:
        for T in args.seq_lens:
            B, H = max(1, args.tokens // T), max(1, args.d_model // K)
            G = max(1, H // args.kv_ratio)
            keys = jax.random.split(jax.random.PRNGKey(0), 4)
            q = jax.random.normal(keys[0], (B, T, H, K), dtype)
            k = jax.random.normal(keys[1], (B, T, G, K), dtype)
            v = jax.random.normal(keys[2], (B, T, G, K), dtype)
            do = jax.random.normal(keys[3], (B, T, H, K), dtype)
            flops_fwd = 4 * B * H * T * T * K * (0.5 if args.causal else 1.0)
            flops_fwd_bwd = 3.5 * flops_fwd
            runs = {name: _measure(fn, (q, k, v, do), args.causal, args.repeats)
                    for name, fn in (("kernel", kernel), ("dpa", dpa), ("reference", reference))}
            ours, base, ref = runs["kernel"], runs["dpa"], runs["reference"]
            err = None
            if ours["outputs"] is not None and ref["outputs"] is not None:
                err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                          for a, b in zip(ours["outputs"], ref["outputs"], strict=True))
            row = {
                "bench": "attention", "device": jax.devices()[0].device_kind, "backend": backend,
                "interpret": on_cpu, "dtype": args.dtype, "causal": args.causal,
                "B": B, "T": T, "H": H, "G": G, "K": K,
                "fwd_tflops": _tflops(ours["fwd_s"], flops_fwd),
                "fwd_bwd_tflops": _tflops(ours["fwd_bwd_s"], flops_fwd_bwd),
                "dpa_impl": dpa_impl,
                "dpa_fwd_tflops": _tflops(base["fwd_s"], flops_fwd),
                "dpa_fwd_bwd_tflops": _tflops(base["fwd_bwd_s"], flops_fwd_bwd),
                "fwd_ratio_to_dpa": _ratio(base["fwd_s"], ours["fwd_s"]),
                "fwd_bwd_ratio_to_dpa": _ratio(base["fwd_bwd_s"], ours["fwd_bwd_s"]),
                "fwd_ratio_to_reference": _ratio(ref["fwd_s"], ours["fwd_s"]),
                "fwd_bwd_ratio_to_reference": _ratio(ref["fwd_bwd_s"], ours["fwd_bwd_s"]),
                "peak_bytes": ours["peak_bytes"],
                "dpa_peak_bytes": base["peak_bytes"],
                "reference_peak_bytes": ref["peak_bytes"],
                "peak_ratio_to_reference": (round(ours["peak_bytes"] / ref["peak_bytes"], 4)
                                            if ours["peak_bytes"] and ref["peak_bytes"] else None),
                "max_abs_err_vs_reference": err,
            }
            for name, run in runs.items():
                if "error" in run:
                    row[f"{name}_error"] = run["error"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
