"""Benchmark: the MoE layer's dispatch implementations, and an MoE train step vs its dense twin.

Prints one JSON line, every number measured in the same process:

* ``layer``: forward+backward tokens/s of one MoE FFN (``jscale.models.parts.moe.MoE``; d-input and
  d-weights) for each dispatch — the dropless sort + grouped matmul with the Pallas kernel
  (``impl="pallas"``) and with ``jax.lax.ragged_dot`` (``impl="xla"``), and a dense one-hot einsum
  dispatch that computes every expert on every token and weights the outputs by the gates (E/k
  times the FLOPs) — and the kernel's and the einsum's ratios to ``ragged_dot`` (> 1: faster).
* ``train``: seconds per jitted train step of an MoE preset (default ``moe-tiny``) and of the dense
  model with the same active parameters (the preset with ``model.moe = None`` and ``d_ff`` =
  ``(top_k + n_shared_experts) · d_expert``: the width of a token's FFN), and their ratio.

    python experiments/bench_moe.py                                   # CPU: small shapes (~30 s)
    python experiments/bench_moe.py --tokens 16384 --d-model 2048 --d-expert 1408 \\
        --experts 8 16 64 --top-k 2 --dtype bfloat16 --repeats 20 --preset moe-small   # a GPU

On CPU the kernel runs in Pallas's interpreter: its numbers check the harness, not its speed.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
from bench_train import median_time, train_step_seconds  # experiments/ is on sys.path when a script runs

import jscale
from jscale.config import parse_overrides
from jscale.models.parts.base import Context
from jscale.models.parts.moe import MoE, route


def _params(layer: MoE, dtype, key) -> dict:
    """Random weights for ``layer``'s leaves (the router in float32, as the part keeps it)."""
    out = {}
    for leaf, k in zip(layer.leaves(), jax.random.split(key, len(layer.leaves())), strict=True):
        (name,) = leaf.path
        fan_in = leaf.shape[-2]
        dt = jnp.float32 if name.startswith("w_router") else dtype
        out[name] = (jax.random.normal(k, leaf.shape, jnp.float32) / math.sqrt(fan_in)).astype(dt)
    return out


def einsum_moe(p: dict, h_BTD, *, top_k: int, router: str):
    """Dense dispatch: every expert on every token (SwiGLU), outputs weighted by the gates."""
    B, T, D = h_BTD.shape
    E = p["w_router_DE"].shape[1]
    h_TD = h_BTD.reshape(B * T, D)
    logits_TE = jnp.einsum("td,de->te", h_TD.astype(jnp.float32), p["w_router_DE"])
    idx_Tk, gates_Tk, _ = route(logits_TE, jnp.zeros((E,), jnp.float32), top_k=top_k,
                                router=router)
    w_TE = jnp.einsum("tk,tke->te", gates_Tk, jax.nn.one_hot(idx_Tk, E, dtype=gates_Tk.dtype))
    g_TEF = jnp.einsum("td,edf->tef", h_TD, p["w_gate_EDF"])
    u_TEF = jnp.einsum("td,edf->tef", h_TD, p["w_up_EDF"])
    y_TED = jnp.einsum("tef,efd->ted", jax.nn.silu(g_TEF) * u_TEF, p["w_down_EFD"])
    y_TD = jnp.einsum("ted,te->td", y_TED, w_TE.astype(y_TED.dtype))
    return y_TD.reshape(B, T, D)


def _fwd_bwd(fn):
    """Jitted forward + backward of ``sum(fn(p, h) · dy)``: the output, d-input and d-weights."""
    def run(p, h, dy):
        out, vjp = jax.vjp(fn, p, h)
        return out, *vjp(dy)
    return jax.jit(run)


def layer_bench(args, E: int) -> dict:
    dtype = jnp.dtype(args.dtype)
    B, T = 1, args.tokens
    layer = {impl: MoE(d_model=args.d_model, n_experts=E, top_k=args.top_k,
                       d_expert=args.d_expert, impl=impl) for impl in ("pallas", "xla")}
    kp, kh, kd = jax.random.split(jax.random.PRNGKey(E), 3)
    p = _params(layer["xla"], dtype, kp)
    h = jax.random.normal(kh, (B, T, args.d_model), dtype)
    dy = jax.random.normal(kd, (B, T, args.d_model), dtype)
    ctx = Context(segment_ids_BT=None, positions_BT=jnp.broadcast_to(jnp.arange(T), (B, T)))

    def part(impl):
        return lambda p_, h_: layer[impl].apply(p_, h_, ctx)[0]

    fns = {"pallas": part("pallas"), "xla": part("xla"),
           "einsum": lambda p_, h_: einsum_moe(p_, h_, top_k=args.top_k, router="softmax_topk")}
    progs = {k: _fwd_bwd(f) for k, f in fns.items()}
    outs = {k: jax.block_until_ready(f(p, h, dy)) for k, f in progs.items()}
    secs = {k: median_time(f, p, h, dy, repeats=args.repeats) for k, f in progs.items()}

    def err(a, b):  # largest difference of outputs and gradients vs ragged_dot
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        return float(max(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))
                         for x, y in zip(la, lb, strict=True)))

    return {"E": E, **{f"{k}_tokens_per_s": round(B * T / s, 1) for k, s in secs.items()},
            "pallas_vs_ragged_dot": round(secs["xla"] / secs["pallas"], 3),
            "einsum_vs_ragged_dot": round(secs["xla"] / secs["einsum"], 3),
            "pallas_max_abs_err": err(outs["pallas"], outs["xla"]),
            "einsum_max_abs_err": err(outs["einsum"], outs["xla"])}


def train_bench(args) -> dict:
    cfg = jscale.presets.get(args.preset).override(parse_overrides(args.overrides))
    moe = cfg.model.moe
    if moe is None:
        raise SystemExit(f"--preset {args.preset}: not an MoE preset (model.moe is None)")
    d_expert = moe.d_expert or cfg.model.d_ff
    dense = cfg.override({"model.moe": None,
                          "model.d_ff": (moe.top_k + moe.n_shared_experts) * d_expert})
    moe_s, dense_s = train_step_seconds(cfg, args.steps), train_step_seconds(dense, args.steps)
    counts = jscale.count_params(cfg.model)
    return {"preset": args.preset, "impl": moe.impl, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.train.seq_len, "moe_params_total": counts["total"],
            "moe_params_active": counts["active"],
            "dense_params": jscale.count_params(dense.model)["total"],
            "moe_step_s": round(moe_s, 5), "dense_step_s": round(dense_s, 5),
            "moe_over_dense_step_time": round(moe_s / dense_s, 3)}


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256 if on_cpu else 16384,
                    help="tokens per MoE-layer call")
    ap.add_argument("--d-model", type=int, default=128 if on_cpu else 2048)
    ap.add_argument("--d-expert", type=int, default=128 if on_cpu else 1408)
    ap.add_argument("--experts", type=int, nargs="+", default=[8] if on_cpu else [8, 16, 64])
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    ap.add_argument("--repeats", type=int, default=3 if on_cpu else 20)
    ap.add_argument("--preset", default="moe-tiny", help="MoE preset for the train-step ratio")
    ap.add_argument("--steps", type=int, default=3 if on_cpu else 20, help="timed train steps")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="override on the preset (e.g. model.moe.impl=pallas)")
    args = ap.parse_args()
    if any(e < args.top_k for e in args.experts):
        ap.error(f"--experts: each E must be ≥ --top-k {args.top_k} (got {args.experts})")

    print(json.dumps({
        "bench": "moe", "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "interpret": on_cpu, "dtype": args.dtype, "tokens": args.tokens, "d_model": args.d_model,
        "d_expert": args.d_expert, "top_k": args.top_k,
        "layer": [layer_bench(args, E) for E in args.experts], "train": train_bench(args),
    }))


if __name__ == "__main__":
    main()
