"""Mamba-1 (selective state-space) language model as pure functions over a parameter pytree.

Token embedding → ``n_layers`` pre-norm residual blocks ``x + Mamba(RMSNorm(x))`` → final RMSNorm →
LM head (tied or not). The block is ``Mamba`` of state-spaces/mamba
``mamba_ssm/modules/mamba_simple.py``: in_proj to ``(x, z)``; causal depthwise conv1d of width
``d_conv`` + SiLU on ``x``; x_proj to ``(Δ, B, C)`` (split ``[dt_rank, d_state, d_state]``); dt_proj
(weight only; its bias enters the scan as ``delta_bias`` with softplus); ``A = -exp(A_log)``; the
selective scan with skip ``D`` and gate ``silu(z)``; out_proj. Block parameters are stacked on a
leading ``L`` axis and run with ``lax.scan``.

Packed documents (``segment_ids_BT``) are isolated as in the original's variable-length mode
(``cu_seqlens`` / ``seq_idx``): the conv reads no input from another document and the scan state is
reset where a new document starts. So, as with the transformer's masked attention, no token sees
another document.

Letters (the glossary of :mod:`jscale.nn`, plus what this family needs): D model width, F inner
width ``expand · d_model`` (the block's expanded width, like an FFN's), N SSM state (``d_state``),
K Δ rank (``dt_rank``), W conv width (``d_conv``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jscale import nn
from jscale.config import check
from jscale.sharding import constrain, constrain_params, per_shard
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.selective_scan.reference import softplus

Array = jax.Array
DTYPES = ("float32", "bfloat16", "float16")
SCAN_IMPLS = ("auto", "pallas", "xla")
REMAT_POLICIES = ("none", "full")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaConfig:
    """Shape and numerics of a Mamba-1 language model (defaults as in ``mamba_simple.Mamba``).

    Attributes:
      vocab_size: V; must equal the tokenizer's vocabulary.
      d_model: D, residual width.
      n_layers: L, number of blocks.
      d_state: N, SSM state size per channel.
      d_conv: W, causal depthwise conv width.
      expand: inner width F = ``expand · d_model``.
      dt_rank: K, rank of the Δ projection; ``"auto"`` means ``ceil(d_model / 16)``.
      dt_min, dt_max: softplus(dt_proj bias) is initialized log-uniform in ``[dt_min, dt_max]``...
      dt_init_floor: ...and clamped below at this floor.
      dt_scale: dt_proj weight ~ U(±dt_scale / sqrt(dt_rank)).
      conv_bias: conv1d has a bias.
      bias: in_proj and out_proj have biases.
      norm_eps: RMSNorm epsilon.
      tie_embeddings: use the embedding table as the LM head.
      init_scale: multiplies the std of the in/x/out projections and the embedding.
      dtype: compute dtype of activations and matmuls (the scan's state is always float32).
      param_dtype: storage dtype of parameters (``A_log``, ``D`` and the Δ bias stay float32).
      remat: ``"none"`` or ``"full"`` (recompute each block in the backward pass).
      scan_impl: selective scan implementation, ``"auto" | "pallas" | "xla"`` (see
        :func:`pallas_kernels.selective_scan`).
      scan_chunk: time chunk of the scan (``None``: the implementation's default).
      scan_layers: run blocks with ``lax.scan`` (True) or a Python loop over the same parameters.
    """

    vocab_size: int = 257
    d_model: int = 128
    n_layers: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | Literal["auto"] = "auto"
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_scale: float = 1.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    remat: Literal["none", "full"] = "none"
    scan_impl: Literal["auto", "pallas", "xla"] = "auto"
    scan_chunk: int | None = None
    scan_layers: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand",
                     "dt_min", "dt_max", "dt_init_floor", "dt_scale", "norm_eps", "init_scale"):
            value = getattr(self, name)
            check(value > 0, f"model.{name}", "must be > 0", value)
        check(self.dt_rank == "auto" or (isinstance(self.dt_rank, int) and self.dt_rank > 0),
              "model.dt_rank", "must be 'auto' or an int > 0", self.dt_rank)
        check(self.dt_min <= self.dt_max, "model.dt_min",
              f"must be <= model.dt_max={self.dt_max}", self.dt_min)
        check(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}", self.dtype)
        check(self.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}",
              self.param_dtype)
        check(self.remat in REMAT_POLICIES, "model.remat", f"must be one of {REMAT_POLICIES}",
              self.remat)
        check(self.scan_impl in SCAN_IMPLS, "model.scan_impl", f"must be one of {SCAN_IMPLS}",
              self.scan_impl)
        check(self.scan_chunk is None or self.scan_chunk > 0, "model.scan_chunk",
              "must be > 0 or None", self.scan_chunk)

    @property
    def d_inner(self) -> int:
        """F, the inner width ``expand · d_model``."""
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        """K, the resolved ``dt_rank``."""
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank


# --------------------------------------------------------------------------------------------------
# init


def init(key: Array, cfg: MambaConfig) -> dict[str, Any]:
    """Initialize parameters.

    As in ``mamba_simple.Mamba``: dt_proj weight ~ U(±dt_scale·K^-½); dt_proj bias = softplus⁻¹(Δ)
    with Δ log-uniform in ``[dt_min, dt_max]``, floored at ``dt_init_floor``; ``A_log[f, n] =
    log(n + 1)``; ``D = 1``; conv weight and bias ~ U(±W^-½) (PyTorch's Conv1d default). The in/x
    projections and the embedding use jscale's truncated normal with std
    ``init_scale / sqrt(fan_in)``; out_proj additionally ``/ sqrt(n_layers)`` (the original's
    prenorm-residual rescale); biases 0.
    """
    D, L, F, N, K, W, V = (cfg.d_model, cfg.n_layers, cfg.d_inner, cfg.d_state, cfg.rank,
                           cfg.d_conv, cfg.vocab_size)
    pd = jnp.dtype(cfg.param_dtype)
    s = cfg.init_scale
    # Every random leaf comes from one truncated-normal and one uniform draw (two small programs to
    # compile instead of one per leaf). Normal leaves: (name, shape, std).
    normal = [("table_VD", (V, D), s / math.sqrt(D)),
              ("w_in_x_LDF", (L, D, F), s / math.sqrt(D)),
              ("w_in_z_LDF", (L, D, F), s / math.sqrt(D)),
              ("w_x_dt_LFK", (L, F, K), s / math.sqrt(F)),
              ("w_x_b_LFN", (L, F, N), s / math.sqrt(F)),
              ("w_x_c_LFN", (L, F, N), s / math.sqrt(F)),
              ("w_out_LFD", (L, F, D), s / math.sqrt(F) / math.sqrt(L))]
    if not cfg.tie_embeddings:
        normal.append(("w_DV", (D, V), s / math.sqrt(D)))
    # Uniform leaves: (name, shape, low, high); "log_dt" becomes the Δ bias below.
    uniform = [("w_conv_LWF", (L, W, F), -W ** -0.5, W ** -0.5),
               ("w_dt_LKF", (L, K, F), -cfg.dt_scale * K ** -0.5, cfg.dt_scale * K ** -0.5),
               ("log_dt", (L, F), math.log(cfg.dt_min), math.log(cfg.dt_max))]
    if cfg.conv_bias:
        uniform.append(("b_conv_LF", (L, F), -W ** -0.5, W ** -0.5))
    normal_key, uniform_key = jax.random.split(key)
    leaves = {}
    z = nn.truncated_normal(normal_key, (sum(math.prod(sh) for _, sh, _ in normal),), 1.0,
                            jnp.float32)
    offset = 0
    for name, shape, std in normal:
        size = math.prod(shape)
        leaves[name] = (z[offset:offset + size].reshape(shape) * std).astype(pd)
        offset += size
    r = jax.random.uniform(uniform_key, (sum(math.prod(sh) for _, sh, _, _ in uniform),))
    offset = 0
    for name, shape, low, high in uniform:
        size = math.prod(shape)
        leaves[name] = low + (high - low) * r[offset:offset + size].reshape(shape)
        offset += size

    dt = jnp.maximum(jnp.exp(leaves.pop("log_dt")), cfg.dt_init_floor)
    mixer = {name: leaves[name].astype(pd) for name in
             ("w_in_x_LDF", "w_in_z_LDF", "w_conv_LWF", "w_x_dt_LFK", "w_x_b_LFN", "w_x_c_LFN",
              "w_dt_LKF", "w_out_LFD")}
    mixer.update({
        "b_dt_LF": dt + jnp.log(-jnp.expm1(-dt)),                 # softplus⁻¹(Δ), float32
        "a_log_LFN": jnp.broadcast_to(jnp.log(jnp.arange(1, N + 1, dtype=jnp.float32)), (L, F, N)),
        "skip_LF": jnp.ones((L, F), jnp.float32),
    })
    if cfg.conv_bias:
        mixer["b_conv_LF"] = leaves["b_conv_LF"].astype(pd)
    if cfg.bias:
        mixer.update(b_in_x_LF=jnp.zeros((L, F), pd), b_in_z_LF=jnp.zeros((L, F), pd),
                     b_out_LD=jnp.zeros((L, D), pd))
    params = {
        "embed": {"table_VD": leaves["table_VD"]},
        "layers": {"norm": {"scale_LD": jnp.ones((L, D), pd)}, "mixer": mixer},
        "final_norm": {"scale_D": jnp.ones((D,), pd)},
    }
    if not cfg.tie_embeddings:
        params["head"] = {"w_DV": leaves["w_DV"]}
    return params


# --------------------------------------------------------------------------------------------------
# apply


#: Leaves whose std ``init_scale`` multiplies (the truncated-normal ones; the conv, Δ projection and
#: SSM parameters keep the original's initialization).
INIT_SCALED = ("table_VD", "w_in_x_LDF", "w_in_z_LDF", "w_x_dt_LFK", "w_x_b_LFN", "w_x_c_LFN",
               "w_out_LFD", "w_DV")


def scale_init(params: dict[str, Any], init_scale: Array) -> dict[str, Any]:
    """``params`` made with ``init_scale=1`` → as if made with ``init_scale`` (a traced array, so a
    sweep can vary it per run): the :data:`INIT_SCALED` leaves scale by it."""
    def leaf(path, x):
        return x * init_scale.astype(x.dtype) if str(path[-1].key) in INIT_SCALED else x
    return jax.tree_util.tree_map_with_path(leaf, params)


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


def _ssm_inputs(xc_BTF: Array, m: dict[str, Array], cdt) -> tuple[Array, Array, Array, Array]:
    """x_proj and dt_proj: ``(delta_BTF, b_BTN, c_BTN, A_FN)``; Δ without its bias."""
    delta_BTK = jnp.einsum("btf,fk->btk", xc_BTF, m["w_x_dt_LFK"].astype(cdt))
    b_BTN = jnp.einsum("btf,fn->btn", xc_BTF, m["w_x_b_LFN"].astype(cdt))
    c_BTN = jnp.einsum("btf,fn->btn", xc_BTF, m["w_x_c_LFN"].astype(cdt))
    delta_BTF = jnp.einsum("btk,kf->btf", delta_BTK, m["w_dt_LKF"].astype(cdt))
    A_FN = -jnp.exp(m["a_log_LFN"].astype(jnp.float32))
    return delta_BTF, b_BTN, c_BTN, A_FN


def _in_proj(h_BTD: Array, m: dict[str, Array], cdt) -> tuple[Array, Array]:
    x_BTF = jnp.einsum("btd,df->btf", h_BTD, m["w_in_x_LDF"].astype(cdt))
    z_BTF = jnp.einsum("btd,df->btf", h_BTD, m["w_in_z_LDF"].astype(cdt))
    if "b_in_x_LF" in m:
        x_BTF = x_BTF + m["b_in_x_LF"].astype(cdt)
        z_BTF = z_BTF + m["b_in_z_LF"].astype(cdt)
    return x_BTF, z_BTF


def _out_proj(y_BTF: Array, m: dict[str, Array], cdt) -> Array:
    out_BTD = jnp.einsum("btf,fd->btd", y_BTF, m["w_out_LFD"].astype(cdt))
    if "b_out_LD" in m:
        out_BTD = out_BTD + m["b_out_LD"].astype(cdt)
    return out_BTD


def mixer(h_BTD: Array, m: dict[str, Array], cfg: MambaConfig, *,
          segment_ids_BT: Array | None = None) -> Array:
    """The Mamba mixer on un-stacked (one layer's) parameters ``m``: ``[B, T, D] -> [B, T, D]``."""
    cdt = h_BTD.dtype  # compute dtype
    x_BTF, z_BTF = _in_proj(h_BTD, m, cdt)
    x_BTF, z_BTF = constrain(x_BTF, "BTF"), constrain(z_BTF, "BTF")
    xc_BTF = jax.nn.silu(causal_conv(x_BTF, m["w_conv_LWF"], m.get("b_conv_LF"),
                                     segment_ids_BT=segment_ids_BT))
    delta_BTF, b_BTN, c_BTN, A_FN = _ssm_inputs(xc_BTF, m, cdt)
    reset_BT = None
    if segment_ids_BT is not None:
        reset_BT = jnp.concatenate([jnp.zeros_like(segment_ids_BT[:, :1], bool),
                                    segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    def scan(u_BTF, delta_BTF, A_FN, b_BTN, c_BTN, skip_F, z_BTF, delta_bias_F, reset_BT):
        return selective_scan(u_BTF, delta_BTF, A_FN, b_BTN, c_BTN, skip_F, z_BTF, delta_bias_F,
                              delta_softplus=True, reset=reset_BT, impl=cfg.scan_impl,
                              chunk=cfg.scan_chunk)
    if cfg.scan_impl != "xla":  # on a mesh the kernel runs on each device's rows and channels
        scan = per_shard(scan, ("BTF", "BTF", "FN", "BTN", "BTN", "F", "BTF", "F", "BT"), "BTF")
    y_BTF = scan(xc_BTF, delta_BTF, A_FN, b_BTN, c_BTN, m["skip_LF"], z_BTF, m["b_dt_LF"], reset_BT)
    return _out_proj(y_BTF.astype(cdt), m, cdt)


def apply(params: dict[str, Any], tokens_BT: Array, cfg: MambaConfig, *,
          segment_ids_BT: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Forward pass: ``tokens_BT`` int ids -> ``(logits_BTV float32, aux)``; ``aux`` is empty.

    ``segment_ids_BT`` (optional) isolates packed documents: conv and scan state do not cross a
    change of segment id.
    """
    table_VD = constrain_params(params["embed"]["table_VD"], "VD")
    x_BTD = constrain(nn.embed(table_VD, tokens_BT, jnp.dtype(cfg.dtype)), "BTD")
    return apply_embedded(params, x_BTD, cfg, segment_ids_BT=segment_ids_BT)


def apply_embedded(params: dict[str, Any], x_BTD: Array, cfg: MambaConfig, *,
                   segment_ids_BT: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The model after the embedding lookup: embedded inputs ``x_BTD`` -> ``(logits_BTV, aux)``."""
    x_BTD = x_BTD.astype(jnp.dtype(cfg.dtype))

    def body(x_BTD, p):
        p = constrain_params(p)  # FSDP: this layer's weights are gathered here, inside the scan
        x_BTD = constrain(x_BTD, "BTD")
        h_BTD = nn.rms_norm(x_BTD, p["norm"]["scale_LD"], cfg.norm_eps)
        return x_BTD + mixer(h_BTD, p["mixer"], cfg, segment_ids_BT=segment_ids_BT), None

    if cfg.remat == "full":
        body = jax.checkpoint(body)
    if cfg.scan_layers:
        x_BTD, _ = jax.lax.scan(body, x_BTD, params["layers"])
    else:
        for i in range(cfg.n_layers):
            x_BTD, _ = body(x_BTD, jax.tree.map(lambda a, i=i: a[i], params["layers"]))
    return _head(params, x_BTD, cfg), {}


def _head(params: dict[str, Any], x_BxD: Array, cfg: MambaConfig) -> Array:
    x_BxD = nn.rms_norm(x_BxD, params["final_norm"]["scale_D"], cfg.norm_eps)
    w_DV = params["embed"]["table_VD"].T if cfg.tie_embeddings else params["head"]["w_DV"]
    return jnp.einsum("...d,dv->...v", x_BxD, w_DV.astype(x_BxD.dtype),
                      preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------------
# recurrent decode


def init_state(cfg: MambaConfig, batch_size: int) -> dict[str, Array]:
    """Empty decode state: the last ``W`` conv inputs and the SSM state of every layer."""
    L, F, N, W = cfg.n_layers, cfg.d_inner, cfg.d_state, cfg.d_conv
    return {"conv_LBWF": jnp.zeros((L, batch_size, W, F), jnp.dtype(cfg.dtype)),
            "ssm_LBFN": jnp.zeros((L, batch_size, F, N), jnp.float32)}


def step(params: dict[str, Any], token_B: Array, state: dict[str, Array],
         cfg: MambaConfig) -> tuple[Array, dict[str, Array]]:
    """One token of recurrent decoding (``Mamba.step``): ``(logits_BV float32, new state)``.

    O(1) in the sequence length: the conv keeps its last ``W`` inputs, the SSM its ``[F, N]`` state.
    Feeding a sequence one token at a time from :func:`init_state` gives :func:`apply`'s logits.
    """
    cdt = jnp.dtype(cfg.dtype)  # compute dtype
    x_BD = nn.embed(params["embed"]["table_VD"], token_B, cdt)

    def body(x_BD, layer):
        p, conv_BWF, ssm_BFN = layer
        m = p["mixer"]
        h_BD = nn.rms_norm(x_BD, p["norm"]["scale_LD"], cfg.norm_eps)
        x_BF, z_BF = _in_proj(h_BD[:, None], m, cdt)
        conv_BWF = jnp.concatenate([conv_BWF[:, 1:], x_BF], axis=1)
        xc_BF = jnp.einsum("bwf,wf->bf", conv_BWF.astype(jnp.float32),
                           m["w_conv_LWF"].astype(jnp.float32))
        if "b_conv_LF" in m:
            xc_BF = xc_BF + m["b_conv_LF"].astype(jnp.float32)
        xc_BF = jax.nn.silu(xc_BF).astype(cdt)
        delta_B1F, b_B1N, c_B1N, A_FN = _ssm_inputs(xc_BF[:, None], m, cdt)
        delta_BF = softplus(delta_B1F[:, 0].astype(jnp.float32) + m["b_dt_LF"])
        b_BN, c_BN = b_B1N[:, 0].astype(jnp.float32), c_B1N[:, 0].astype(jnp.float32)
        ssm_BFN = (jnp.exp(delta_BF[..., None] * A_FN) * ssm_BFN
                   + (delta_BF * xc_BF.astype(jnp.float32))[..., None] * b_BN[:, None, :])
        y_BF = jnp.einsum("bfn,bn->bf", ssm_BFN, c_BN) + m["skip_LF"] * xc_BF.astype(jnp.float32)
        y_BF = y_BF * jax.nn.silu(z_BF[:, 0].astype(jnp.float32))
        x_BD = x_BD + _out_proj(y_BF.astype(cdt)[:, None], m, cdt)[:, 0]
        return x_BD, (conv_BWF, ssm_BFN)

    x_BD, (conv, ssm) = jax.lax.scan(body, x_BD, (params["layers"], state["conv_LBWF"],
                                                  state["ssm_LBFN"]))
    return _head(params, x_BD, cfg), {"conv_LBWF": conv, "ssm_LBFN": ssm}


# --------------------------------------------------------------------------------------------------
# counting


def count_params(cfg: MambaConfig) -> dict[str, int]:
    """Analytic parameter count: ``total``, ``embedding`` (the V×D table, plus the untied head),
    ``with_head`` (``non_embedding`` plus the V×D output head, tied or not: the N whose FLOPs ``6ND``
    counts — Porian et al. 2024) and
    ``non_embedding`` (blocks and the final norm)."""
    D, L, F, N, K, W, V = (cfg.d_model, cfg.n_layers, cfg.d_inner, cfg.d_state, cfg.rank,
                           cfg.d_conv, cfg.vocab_size)
    per_layer = (D                                  # norm
                 + 2 * D * F                        # in_proj (x, z)
                 + W * F + (F if cfg.conv_bias else 0)
                 + F * (K + 2 * N)                  # x_proj (Δ, B, C)
                 + K * F + F                        # dt_proj weight + Δ bias
                 + F * N + F                        # A_log, D
                 + F * D                            # out_proj
                 + ((2 * F + D) if cfg.bias else 0))
    embedding = V * D * (1 if cfg.tie_embeddings else 2)
    non_embedding = L * per_layer + D
    return {"total": embedding + non_embedding, "non_embedding": non_embedding,
            "embedding": embedding, "with_head": non_embedding + V * D}


#: FLOPs per token per channel per state of the selective scan: discretize (Δ·A, exp, Δ·B·u: 3), the
#: state update (multiply-add: 2) and the read-out (C·h multiply-add: 2), plus D·u and the gate
#: (rounded up to the Mamba paper's 9·B·L·D·N).
SCAN_FLOPS_PER_FN = 9


def flops_per_token(cfg: MambaConfig, seq_len: int | None = None) -> dict[str, float]:
    """Model FLOPs per token (a multiply-add is 2 FLOPs); linear in length: ``seq_len`` is unused.

    Counts the matmuls (in_proj, x_proj, dt_proj, out_proj, LM head), the depthwise conv (``2·W·F``)
    and the selective scan (``SCAN_FLOPS_PER_FN · F · N``, the Mamba paper's convention: the
    sequential recurrence). Norms, activations and the embedding gather are not counted.
    ``training`` is 3× ``forward``.

    Model FLOPs, not the work an implementation does: ``scan_impl="xla"`` runs an associative
    (Hillis–Steele) scan inside each chunk, ``log2(chunk)`` rounds over the chunk's transitions —
    several times the recurrence's arithmetic — and that extra work is not counted; nor is the
    Pallas backward's recomputation of each chunk's states. The count matches XLA's cost analysis of
    the forward pass with the sequential scan, except for the scan's own term, which XLA cannot
    count (tests/test_mamba.py says why).
    """
    D, L, F, N, K, W, V = (cfg.d_model, cfg.n_layers, cfg.d_inner, cfg.d_state, cfg.rank,
                           cfg.d_conv, cfg.vocab_size)
    matmuls = 2 * (2 * D * F + F * (K + 2 * N) + K * F + F * D)
    per_layer = matmuls + 2 * W * F + SCAN_FLOPS_PER_FN * F * N
    forward = L * per_layer + 2 * D * V
    return {"forward": float(forward), "training": float(3 * forward)}
