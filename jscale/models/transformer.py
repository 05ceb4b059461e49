"""Dense decoder-only transformer: its config and its family object.

Token embedding → ``n_layers`` pre-norm blocks (RMSNorm, grouped-query attention with RoPE and optional
qk-norm, SwiGLU FFN) → final RMSNorm → LM head (tied to the embedding or not), on the shared scaffold
(:mod:`jscale.models.lm`) with the parts :class:`~jscale.models.parts.attention.Attention`
(``layers.attn``, pre-norm ``layers.attn_norm``) and :class:`~jscale.models.parts.swiglu.SwiGLU`
(``layers.mlp``, pre-norm ``layers.mlp_norm``). Leaf names end in their shape letters (glossary in
:mod:`jscale.nn`).

**Mixture of experts** (``moe``: a :class:`~jscale.models.moe.MoEConfig`; ``None`` is the dense model,
bitwise as before): the FFN of the chosen layers (:func:`moe_layer_indices`) is an
:class:`~jscale.models.parts.moe.MoE` part. The layers become up to three scanned stacks of the
shared scaffold, run in order: ``layers`` (the ``first_dense_layers`` dense layers, the dense
block), ``moe_layers`` (periods of ``every`` layers: ``every - 1`` dense layers, their sub-layers
``attn_<j>``/``mlp_<j>`` with norms ``attn_norm_<j>``/``mlp_norm_<j>``, then one MoE layer ``attn``/
``moe`` with norms ``attn_norm``/``moe_norm``) and ``tail_layers`` (the dense layers left after the
last whole period). The router bias is model state ``model_state["moe_layers"]["moe"]["bias_LE"]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax

from jscale import registry
from jscale.config import check
from jscale.models import lm
from jscale.models.lm import DTYPES, REMAT_POLICIES
from jscale.models.moe import MoEConfig
from jscale.models.parts.attention import Attention, attention  # noqa: F401  (attention: re-exported)
from jscale.models.parts.moe import MoE
from jscale.models.parts.swiglu import SwiGLU

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Shape and numerics of a dense decoder transformer.

    Attributes:
      vocab_size: V; must equal the tokenizer's vocabulary.
      d_model: D, residual width.
      n_layers: L, number of blocks.
      n_heads: H, query heads.
      n_kv_heads: G, key/value heads (grouped-query attention); must divide ``n_heads``.
      d_ff: F, SwiGLU hidden width.
      head_dim: K; ``None`` means ``d_model // n_heads`` (then ``n_heads`` must divide ``d_model``).
      max_seq_len: longest sequence the model is used with.
      rope_theta: RoPE base frequency.
      norm_eps: RMSNorm epsilon.
      qk_norm: RMS-normalize queries and keys per head before RoPE (learned scale per head dim).
      qkv_bias: learned biases on the query/key/value projections (Qwen2; Llama has none).
      tie_embeddings: use the embedding table as the LM head.
      init_scale: multiplies every initialization standard deviation.
      dtype: compute dtype of activations and matmuls ("float32", "bfloat16", "float16").
      param_dtype: storage dtype of parameters.
      remat: rematerialization policy of the layer body (see ``REMAT_POLICIES``).
      attention_impl: "xla" (``jax.nn.dot_product_attention``) or "pallas" (the flash-attention
        kernel ``pallas_kernels.flash_attention``; interpret mode on CPU).
      scan_layers: run blocks with ``lax.scan`` (True) or a Python loop over the same stacked
        parameters (False: longer compiles, identical math; used to check the scan).
      moe: the mixture-of-experts FFN (:class:`~jscale.models.moe.MoEConfig`), or ``None``: dense.
    """

    vocab_size: int = 257
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 384
    head_dim: int | None = None
    max_seq_len: int = 512
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = True
    init_scale: float = 1.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    remat: Literal["none", "full", "dots", "dots_no_batch", "save_attention"] = "none"
    attention_impl: Literal["xla", "pallas"] = "xla"
    scan_layers: bool = True
    moe: MoEConfig | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "max_seq_len", "rope_theta", "norm_eps", "init_scale"):
            value = getattr(self, name)
            check(value > 0, f"model.{name}", "must be > 0", value)
        check(self.n_heads % self.n_kv_heads == 0, "model.n_heads",
              f"must be divisible by model.n_kv_heads={self.n_kv_heads}", self.n_heads)
        if self.head_dim is None:
            check(self.d_model % self.n_heads == 0, "model.d_model",
                  f"must be divisible by model.n_heads={self.n_heads} (or set model.head_dim)",
                  self.d_model)
        else:
            check(self.head_dim > 0, "model.head_dim", "must be > 0", self.head_dim)
        check(self.k % 2 == 0, "model.head_dim", "must be even (RoPE rotates pairs)", self.k)
        check(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}", self.dtype)
        check(self.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}",
              self.param_dtype)
        check(self.remat in REMAT_POLICIES, "model.remat", f"must be one of {REMAT_POLICIES}",
              self.remat)
        check(self.attention_impl in ("xla", "pallas"), "model.attention_impl",
              "must be 'xla' or 'pallas'", self.attention_impl)
        if self.moe is not None:
            check(isinstance(self.moe, MoEConfig), "model.moe", "must be a MoEConfig or None",
                  self.moe)
            f = self.moe.first_dense_layers
            check(f < self.n_layers, "model.moe.first_dense_layers",
                  f"must be < model.n_layers={self.n_layers} (at least one MoE layer)", f)
            check(self.moe.every <= self.n_layers - f, "model.moe.every",
                  f"must be <= model.n_layers - model.moe.first_dense_layers = {self.n_layers - f} "
                  "(at least one MoE layer)", self.moe.every)

    @property
    def k(self) -> int:
        """Head dim K."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def d_expert(self) -> int | None:
        """The routed experts' width (``moe.d_expert``, or ``d_ff`` when that is ``None``); ``None``
        for the dense model."""
        if self.moe is None:
            return None
        return self.moe.d_expert if self.moe.d_expert is not None else self.d_ff


def moe_layer_indices(cfg: TransformerConfig) -> tuple[int, ...]:
    """The 0-based indices of the MoE layers (``()`` for the dense model)."""
    if cfg.moe is None:
        return ()
    f, e = cfg.moe.first_dense_layers, cfg.moe.every
    return tuple(i for i in range(f, cfg.n_layers) if (i - f) % e == e - 1)


# ---------------------------------------------------------------------------------------------------
# the family


@functools.lru_cache(maxsize=256)
def spec(cfg: TransformerConfig) -> lm.LMSpec:
    """The scaffold's description of ``cfg``: blocks of attention then SwiGLU (with ``moe``, the
    stacks of the module docstring). Init: truncated normal, std ``init_scale / sqrt(fan_in)``; the
    residual output projections (``w_o``, ``w_down``, the experts' ``w_down``) further
    ``/ sqrt(2 n_layers)``; norm scales 1."""
    out_div = math.sqrt(2 * cfg.n_layers)
    attn = Attention(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                     head_dim=cfg.k, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
                     qk_norm=cfg.qk_norm, impl=cfg.attention_impl, qkv_bias=cfg.qkv_bias,
                     init_scale=cfg.init_scale, out_div=out_div)
    mlp = SwiGLU(d_model=cfg.d_model, d_ff=cfg.d_ff, init_scale=cfg.init_scale, out_div=out_div)
    dense = (lm.Sublayer("attn", "attn_norm", attn), lm.Sublayer("mlp", "mlp_norm", mlp))
    common = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                  norm_eps=cfg.norm_eps, tie_embeddings=cfg.tie_embeddings,
                  init_scale=cfg.init_scale, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  remat=cfg.remat, scan_layers=cfg.scan_layers)
    if cfg.moe is None:
        return lm.LMSpec(**common, block=dense)
    m = cfg.moe
    moe = MoE(d_model=cfg.d_model, n_experts=m.n_experts, top_k=m.top_k, d_expert=cfg.d_expert,
              n_shared_experts=m.n_shared_experts, router=m.router,
              capacity_factor=m.capacity_factor, load_balance_coeff=m.load_balance_coeff,
              z_loss_coeff=m.z_loss_coeff, bias_update_rate=m.bias_update_rate, impl=m.impl,
              init_scale=cfg.init_scale, out_div=out_div)
    period = tuple(lm.Sublayer(f"{name}_{j}", f"{name}_norm_{j}", part)
                   for j in range(m.every - 1) for name, part in (("attn", attn), ("mlp", mlp)))
    period += (lm.Sublayer("attn", "attn_norm", attn), lm.Sublayer("moe", "moe_norm", moe))
    n_periods, n_tail = divmod(cfg.n_layers - m.first_dense_layers, m.every)
    stacks = ((lm.Stack("layers", m.first_dense_layers, dense),) if m.first_dense_layers else ())
    stacks += (lm.Stack("moe_layers", n_periods, period),)
    if n_tail:
        stacks += (lm.Stack("tail_layers", n_tail, dense),)
    return lm.LMSpec(**common, block=(), stacks=stacks)


def flops_per_token(cfg: TransformerConfig, seq_len: int, *,
                    causal_attention: bool = False) -> dict[str, float]:
    """Matmul FLOPs per token (a multiply-add is 2 FLOPs) for sequences of ``seq_len`` tokens.

    Counts the Q/K/V/O projections, the SwiGLU matmuls, the LM head and attention's two T×S matmuls
    (scores and weighted values, ``4·T·H·K`` per token per layer). Convention: by default attention is
    counted **in full** (every query against all ``seq_len`` keys — what the dense XLA path computes,
    and Kaplan/Chinchilla's convention); ``causal_attention=True`` counts only the causal half
    (FlashAttention's convention). Norms, RoPE, softmax and the embedding gather are not counted.
    ``training`` is 3× ``forward`` (backward = 2× forward); rematerialization is not counted (model
    FLOPs, as in MFU).

    With ``moe``, an MoE layer's FFN counts the router (``2·D·E``), the ``top_k`` experts a token is
    sent to and the shared experts — the active FLOPs, not what an implementation runs: on CPU
    ``ragged_dot`` computes every expert on every row (E× the routed FLOPs; tests/families.py), and
    capacity mode computes its padded ``E·C`` rows.
    """
    s = spec(cfg)
    kwargs = {sub.name: {"causal": causal_attention} for st in s.layer_stacks for sub in st.block
              if isinstance(sub.part, Attention)}
    return lm.flops_per_token(s, seq_len, kwargs)


def count_params(cfg: TransformerConfig) -> dict[str, int]:
    """:func:`jscale.models.lm.count_params`, with ``active`` the parameters a token uses: ``total``
    less, in every MoE layer, the routed experts it is not sent to (``(E − top_k) · 3·D·d_expert``)."""
    counts = lm.count_params(spec(cfg))
    if cfg.moe is not None:
        moe = next(sub.part for st in spec(cfg).layer_stacks for sub in st.block
                   if isinstance(sub.part, MoE))
        counts["active"] -= len(moe_layer_indices(cfg)) * (moe.count() - moe.active_count())
    return counts


class TransformerFamily(lm.LMFamily):
    """The dense transformer family (see :class:`jscale.models.protocol.Family`)."""

    name = "transformer"
    config_cls = TransformerConfig

    def spec(self, cfg: TransformerConfig) -> lm.LMSpec:
        return spec(cfg)

    def flops_per_token(self, cfg: TransformerConfig, seq_len: int) -> dict[str, float]:
        return flops_per_token(cfg, seq_len)

    def count_params(self, cfg: TransformerConfig) -> dict[str, int]:
        return count_params(cfg)

    def shape_step(self, base_model: TransformerConfig, *, head_dim: int | None,
                   ffn_ratio: float | None) -> tuple[int, Any]:
        """Widths in multiples of ``head_dim × (n_heads / n_kv_heads)`` (default: ``base_model``'s
        head dim and grouping); ``n_heads = d_model / head_dim``, ``n_kv_heads`` keeps the grouping,
        ``d_ff = ffn_ratio · d_model`` rounded up to a multiple of 8 (default: ``base_model``'s
        ratio). With ``moe``: ``d_expert`` keeps its ratio to ``d_model`` (rounded up to a multiple
        of 8), ``first_dense_layers`` and ``every`` are capped so that a shallow model still has an
        MoE layer."""
        k = head_dim or base_model.k
        ratio = ffn_ratio or base_model.d_ff / base_model.d_model
        q_per_kv = base_model.n_heads // base_model.n_kv_heads
        moe = base_model.moe
        expert_ratio = None if moe is None or moe.d_expert is None else moe.d_expert / base_model.d_model

        def shaped(n_layers: int, d_model: int) -> TransformerConfig:
            n_heads = d_model // k
            new_moe = moe
            if moe is not None:  # the expert width keeps its ratio; the layer pattern fits the depth
                f = min(moe.first_dense_layers, n_layers - 1)
                new_moe = dataclasses.replace(
                    moe, first_dense_layers=f, every=min(moe.every, n_layers - f),
                    d_expert=None if expert_ratio is None else 8 * math.ceil(expert_ratio * d_model / 8))
            return dataclasses.replace(
                base_model, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                head_dim=None if k * n_heads == d_model else k, n_kv_heads=n_heads // q_per_kv,
                d_ff=8 * math.ceil(ratio * d_model / 8), moe=new_moe)
        return k * q_per_kv, shaped

    def describe(self, cfg: TransformerConfig) -> str:
        out = (f"d_model={cfg.d_model} n_layers={cfg.n_layers} n_heads={cfg.n_heads} "
               f"n_kv_heads={cfg.n_kv_heads} d_ff={cfg.d_ff}")
        if cfg.moe is not None:
            m = cfg.moe
            out += (f" moe: n_experts={m.n_experts} top_k={m.top_k} d_expert={cfg.d_expert} "
                    f"shared={m.n_shared_experts} layers={len(moe_layer_indices(cfg))}")
        return out

    def dim_fields(self, cfg: TransformerConfig) -> dict[str, str]:
        out = {**super().dim_fields(cfg), "H": "model.n_heads", "G": "model.n_kv_heads",
               "F": "the FFN / inner width (model.d_ff)", "K": "model.head_dim"}
        if cfg.moe is not None:
            out["E"] = "model.moe.n_experts"
            out["F"] = "the FFN / expert width (model.d_ff, model.moe.d_expert)"
        return out

    def max_seq_len(self, cfg: TransformerConfig) -> int:
        return cfg.max_seq_len


FAMILY = registry.register(TransformerFamily())
