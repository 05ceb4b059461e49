"""The Mamba-1 mixer (conv + selective scan) as a block part.

``Mamba`` of state-spaces/mamba ``mamba_ssm/modules/mamba_simple.py``: in_proj to ``(x, z)``; causal
depthwise conv1d of width ``W`` + SiLU on ``x``; x_proj to ``(Δ, B, C)`` (split ``[J, N, N]``);
dt_proj (weight only; its bias enters the scan as ``delta_bias`` with softplus); ``A = -exp(A_log)``;
the selective scan with skip ``D`` and gate ``silu(z)``; out_proj.

Packed documents (``segment_ids_BT``) are isolated as in the original's variable-length mode
(``cu_seqlens`` / ``seq_idx``): the conv reads no input from another document and the scan state is
reset where a new document starts.

Letters: D model width, F inner width, N SSM state, J Δ rank, W conv width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels.selective_scan as scan_ops
from jscale.models.parts.base import Const, Context, Leaf, Normal, Part, Uniform
from jscale.sharding import constrain, per_shard
from pallas_kernels.selective_scan.reference import softplus

Array = jax.Array

#: FLOPs per token per channel per state of the selective scan: discretize (Δ·A, exp, Δ·B·u: 3), the
#: state update (multiply-add: 2) and the read-out (C·h multiply-add: 2), plus D·u and the gate
#: (rounded up to the Mamba paper's 9·B·L·D·N).
SCAN_FLOPS_PER_FN = 9


def causal_conv(x_BTF: Array, w_WF: Array, b_F: Array | None, *,
                segment_ids_BT: Array | None = None) -> Array:
    """Causal depthwise conv: ``out[t] = Σ_k w[k] x[t - (W-1) + k] (+ b)`` (PyTorch's Conv1d with
    ``padding = W - 1``, truncated to T). With ``segment_ids_BT``, inputs from another segment count
    as zero (causal_conv1d's ``seq_idx``)."""
    W = w_WF.shape[0]
    T = x_BTF.shape[1]
    x_pad = jnp.pad(x_BTF, ((0, 0), (W - 1, 0), (0, 0)))
    if segment_ids_BT is not None:
        seg_pad = jnp.pad(segment_ids_BT, ((0, 0), (W - 1, 0)), constant_values=-1)
    out = jnp.zeros(x_BTF.shape, jnp.float32)
    for k in range(W):
        tap = x_pad[:, k:k + T].astype(jnp.float32)
        if segment_ids_BT is not None and k < W - 1:
            tap = jnp.where((seg_pad[:, k:k + T] == segment_ids_BT)[..., None], tap, 0.0)
        out = out + tap * w_WF[k].astype(jnp.float32)
    if b_F is not None:
        out = out + b_F.astype(jnp.float32)
    return out.astype(x_BTF.dtype)


def _dt_bias(log_dt: Array, *, floor: float) -> Array:
    """softplus⁻¹(Δ) for Δ = max(exp(log_dt), floor), float32."""
    dt = jnp.maximum(jnp.exp(log_dt), floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def _ssm_inputs(xc_BTF: Array, m: dict[str, Array], cdt) -> tuple[Array, Array, Array, Array]:
    """x_proj and dt_proj: ``(delta_BTF, b_BTN, c_BTN, A_FN)``; Δ without its bias."""
    delta_BTJ = jnp.einsum("btf,fj->btj", xc_BTF, m["w_x_dt_FJ"].astype(cdt))
    b_BTN = jnp.einsum("btf,fn->btn", xc_BTF, m["w_x_b_FN"].astype(cdt))
    c_BTN = jnp.einsum("btf,fn->btn", xc_BTF, m["w_x_c_FN"].astype(cdt))
    delta_BTF = jnp.einsum("btj,jf->btf", delta_BTJ, m["w_dt_JF"].astype(cdt))
    A_FN = -jnp.exp(m["a_log_FN"].astype(jnp.float32))
    return delta_BTF, b_BTN, c_BTN, A_FN


def _in_proj(h_BTD: Array, m: dict[str, Array], cdt) -> tuple[Array, Array]:
    x_BTF = jnp.einsum("btd,df->btf", h_BTD, m["w_in_x_DF"].astype(cdt))
    z_BTF = jnp.einsum("btd,df->btf", h_BTD, m["w_in_z_DF"].astype(cdt))
    if "b_in_x_F" in m:
        x_BTF = x_BTF + m["b_in_x_F"].astype(cdt)
        z_BTF = z_BTF + m["b_in_z_F"].astype(cdt)
    return x_BTF, z_BTF


def _out_proj(y_BTF: Array, m: dict[str, Array], cdt) -> Array:
    out_BTD = jnp.einsum("btf,fd->btd", y_BTF, m["w_out_FD"].astype(cdt))
    if "b_out_D" in m:
        out_BTD = out_BTD + m["b_out_D"].astype(cdt)
    return out_BTD


@dataclasses.dataclass(frozen=True)
class MambaMixer(Part):
    """The Mamba-1 mixer part (fields as in :class:`jscale.models.mamba.MambaConfig`; ``d_inner``
    F, ``dt_rank`` J resolved). ``init_scale`` multiplies the in/x/out projections' std, ``out_div``
    further divides out_proj's (the prenorm-residual rescale). ``scan_fn`` (default:
    ``pallas_kernels.selective_scan.selective_scan``, looked up at call time) runs the scan."""

    d_model: int
    d_inner: int
    d_state: int
    dt_rank: int
    d_conv: int
    dt_min: float
    dt_max: float
    dt_init_floor: float
    dt_scale: float
    conv_bias: bool
    bias: bool
    scan_impl: str
    scan_chunk: int | None
    init_scale: float = 1.0
    out_div: float = 1.0
    scan_fn: Callable[..., Array] | None = None

    def leaves(self) -> list[Leaf]:
        """As in ``mamba_simple.Mamba``: dt_proj weight ~ U(±dt_scale·J^-½); dt_proj bias =
        softplus⁻¹(Δ), Δ log-uniform in ``[dt_min, dt_max]`` floored at ``dt_init_floor``;
        ``A_log[f, n] = log(n + 1)``; ``D = 1``; conv weight and bias ~ U(±W^-½); in/x projections
        truncated normal with std ``init_scale / sqrt(fan_in)``, out_proj also ``/ out_div``;
        biases 0. Listed in the draw order of the normal and of the uniform leaves."""
        D, F, N, J, W, s = (self.d_model, self.d_inner, self.d_state, self.dt_rank, self.d_conv,
                            self.init_scale)
        a_log = functools.partial(_a_log, F, N)
        out = [Leaf(("w_in_x_DF",), (D, F), Normal(s / math.sqrt(D))),
               Leaf(("w_in_z_DF",), (D, F), Normal(s / math.sqrt(D))),
               Leaf(("w_conv_WF",), (W, F), Uniform(-W ** -0.5, W ** -0.5)),
               Leaf(("w_x_dt_FJ",), (F, J), Normal(s / math.sqrt(F))),
               Leaf(("w_x_b_FN",), (F, N), Normal(s / math.sqrt(F))),
               Leaf(("w_x_c_FN",), (F, N), Normal(s / math.sqrt(F))),
               Leaf(("w_dt_JF",), (J, F), Uniform(-self.dt_scale * J ** -0.5,
                                                   self.dt_scale * J ** -0.5)),
               Leaf(("w_out_FD",), (F, D), Normal(s / math.sqrt(F) / self.out_div)),
               Leaf(("b_dt_F",), (F,), Uniform(math.log(self.dt_min), math.log(self.dt_max),
                                               functools.partial(_dt_bias,
                                                                 floor=self.dt_init_floor)),
                    float32=True)]
        if self.conv_bias:
            out.append(Leaf(("b_conv_F",), (F,), Uniform(-W ** -0.5, W ** -0.5)))
        out += [Leaf(("a_log_FN",), (F, N), Const(a_log), float32=True),
                Leaf(("skip_F",), (F,), Const(1.0), float32=True)]
        if self.bias:
            out += [Leaf(("b_in_x_F",), (F,), Const(0.0)), Leaf(("b_in_z_F",), (F,), Const(0.0)),
                    Leaf(("b_out_D",), (D,), Const(0.0))]
        return out

    def _scan(self, *args, **kwargs) -> Array:
        fn = self.scan_fn if self.scan_fn is not None else scan_ops.selective_scan
        return fn(*args, **kwargs)

    def apply(self, p: dict[str, Any], h_BTD: Array, ctx: Context, *, prepared: Any = None,
              state: Any = None, layer_input: Any = None) -> tuple[Array, dict, Any]:
        return self.mix(p, h_BTD, segment_ids_BT=ctx.segment_ids_BT), {}, {}

    def mix(self, m: dict[str, Array], h_BTD: Array, *,
            segment_ids_BT: Array | None = None) -> Array:
        """The mixer on one layer's parameters ``m``: ``[B, T, D] -> [B, T, D]``."""
        cdt = h_BTD.dtype  # compute dtype
        x_BTF, z_BTF = _in_proj(h_BTD, m, cdt)
        x_BTF, z_BTF = constrain(x_BTF, "BTF"), constrain(z_BTF, "BTF")
        xc_BTF = jax.nn.silu(causal_conv(x_BTF, m["w_conv_WF"], m.get("b_conv_F"),
                                         segment_ids_BT=segment_ids_BT))
        delta_BTF, b_BTN, c_BTN, A_FN = _ssm_inputs(xc_BTF, m, cdt)
        reset_BT = None
        if segment_ids_BT is not None:
            reset_BT = jnp.concatenate([jnp.zeros_like(segment_ids_BT[:, :1], bool),
                                        segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)

        def scan(u_BTF, delta_BTF, A_FN, b_BTN, c_BTN, skip_F, z_BTF, delta_bias_F, reset_BT):
            return self._scan(u_BTF, delta_BTF, A_FN, b_BTN, c_BTN, skip_F, z_BTF, delta_bias_F,
                              delta_softplus=True, reset=reset_BT, impl=self.scan_impl,
                              chunk=self.scan_chunk)
        if self.scan_impl != "xla":  # on a mesh the kernel runs on each device's rows and channels
            scan = per_shard(scan, ("BTF", "BTF", "FN", "BTN", "BTN", "F", "BTF", "F", "BT"), "BTF")
        y_BTF = scan(xc_BTF, delta_BTF, A_FN, b_BTN, c_BTN, m["skip_F"], z_BTF, m["b_dt_F"],
                     reset_BT)
        return _out_proj(y_BTF.astype(cdt), m, cdt)

    def init_decode(self, batch_size: int, dtype) -> tuple[Array, Array]:
        """One layer's empty decode state: the last ``W`` conv inputs and the SSM state."""
        F, N, W = self.d_inner, self.d_state, self.d_conv
        return (jnp.zeros((batch_size, W, F), dtype), jnp.zeros((batch_size, F, N), jnp.float32))

    def step(self, m: dict[str, Array], h_BD: Array, conv_BWF: Array,
             ssm_BFN: Array) -> tuple[Array, Array, Array]:
        """One token of recurrent decoding (``Mamba.step``) on one layer's parameters:
        ``(out_BD, conv_BWF, ssm_BFN)``; O(1) in the sequence length."""
        cdt = h_BD.dtype
        x_BF, z_BF = _in_proj(h_BD[:, None], m, cdt)
        conv_BWF = jnp.concatenate([conv_BWF[:, 1:], x_BF], axis=1)
        xc_BF = jnp.einsum("bwf,wf->bf", conv_BWF.astype(jnp.float32),
                           m["w_conv_WF"].astype(jnp.float32))
        if "b_conv_F" in m:
            xc_BF = xc_BF + m["b_conv_F"].astype(jnp.float32)
        xc_BF = jax.nn.silu(xc_BF).astype(cdt)
        delta_B1F, b_B1N, c_B1N, A_FN = _ssm_inputs(xc_BF[:, None], m, cdt)
        delta_BF = softplus(delta_B1F[:, 0].astype(jnp.float32) + m["b_dt_F"])
        b_BN, c_BN = b_B1N[:, 0].astype(jnp.float32), c_B1N[:, 0].astype(jnp.float32)
        ssm_BFN = (jnp.exp(delta_BF[..., None] * A_FN) * ssm_BFN
                   + (delta_BF * xc_BF.astype(jnp.float32))[..., None] * b_BN[:, None, :])
        y_BF = jnp.einsum("bfn,bn->bf", ssm_BFN, c_BN) + m["skip_F"] * xc_BF.astype(jnp.float32)
        y_BF = y_BF * jax.nn.silu(z_BF[:, 0].astype(jnp.float32))
        return _out_proj(y_BF.astype(cdt)[:, None], m, cdt)[:, 0], conv_BWF, ssm_BFN

    def count(self) -> int:
        D, F, N, J, W = self.d_model, self.d_inner, self.d_state, self.dt_rank, self.d_conv
        return (2 * D * F                          # in_proj (x, z)
                + W * F + (F if self.conv_bias else 0)
                + F * (J + 2 * N)                  # x_proj (Δ, B, C)
                + J * F + F                        # dt_proj weight + Δ bias
                + F * N + F                        # A_log, D
                + F * D                            # out_proj
                + ((2 * F + D) if self.bias else 0))

    def flops(self, seq_len: int) -> float:
        """The matmuls (in_proj, x_proj, dt_proj, out_proj), the depthwise conv (``2·W·F``) and the
        selective scan (``SCAN_FLOPS_PER_FN · F · N``, the sequential recurrence); linear in
        length: ``seq_len`` is unused."""
        D, F, N, J, W = self.d_model, self.d_inner, self.d_state, self.dt_rank, self.d_conv
        matmuls = 2 * (2 * D * F + F * (J + 2 * N) + J * F + F * D)
        return matmuls + 2 * W * F + SCAN_FLOPS_PER_FN * F * N


def _a_log(F: int, N: int) -> Array:
    return jnp.broadcast_to(jnp.log(jnp.arange(1, N + 1, dtype=jnp.float32)), (F, N))
