"""Dense decoder-only transformer as pure functions over a parameter pytree.

Token embedding → ``n_layers`` pre-norm blocks (RMSNorm, grouped-query attention with RoPE and optional
qk-norm, SwiGLU FFN) → final RMSNorm → LM head (tied to the embedding or not). Block parameters are
stacked on a leading ``L`` axis and run with ``jax.lax.scan``, so compile time is flat in depth and depth
growth is an array operation. Leaf names end in their shape letters (glossary in :mod:`jscale.nn`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jscale import nn
from jscale.config import check
from jscale.sharding import constrain, constrain_params, per_shard

Array = jax.Array
DTYPES = ("float32", "bfloat16", "float16")

#: Rematerialization policies for the layer body: "none" saves every activation; "full" recomputes
#: the whole block in the backward pass; "dots" saves matmul outputs; "dots_no_batch" saves matmul
#: outputs without batch dims (weights-stationary); "save_attention" saves only the attention context
#: (named checkpoint "attn_context") and recomputes the rest.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention")


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
      tie_embeddings: use the embedding table as the LM head.
      init_scale: multiplies every initialization standard deviation.
      dtype: compute dtype of activations and matmuls ("float32", "bfloat16", "float16").
      param_dtype: storage dtype of parameters.
      remat: rematerialization policy of the layer body (see ``REMAT_POLICIES``).
      attention_impl: "xla" (``jax.nn.dot_product_attention``) or "pallas" (the flash-attention
        kernel ``pallas_kernels.flash_attention``; interpret mode on CPU).
      scan_layers: run blocks with ``lax.scan`` (True) or a Python loop over the same stacked
        parameters (False: longer compiles, identical math; used to check the scan).
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
    tie_embeddings: bool = True
    init_scale: float = 1.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    remat: Literal["none", "full", "dots", "dots_no_batch", "save_attention"] = "none"
    attention_impl: Literal["xla", "pallas"] = "xla"
    scan_layers: bool = True

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

    @property
    def k(self) -> int:
        """Head dim K."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


# ---------------------------------------------------------------------------------------------------
# init


def init(key: Array, cfg: TransformerConfig) -> dict[str, Any]:
    """Initialize parameters: truncated normal, std ``init_scale / sqrt(fan_in)``; the residual output
    projections (``w_o``, ``w_down``) are further scaled by ``1 / sqrt(2 n_layers)``; norm scales are 1.
    """
    D, L, H, G, K, F, V = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.k,
                           cfg.d_ff, cfg.vocab_size)
    pd = jnp.dtype(cfg.param_dtype)
    s, out_s = cfg.init_scale, cfg.init_scale / math.sqrt(2 * L)
    # (path, shape, std) of every random leaf; drawn from one truncated-normal call (one small program
    # to compile instead of one per leaf).
    specs = [(("embed", "table_VD"), (V, D), s / math.sqrt(D)),
             (("layers", "attn", "w_q_LDHK"), (L, D, H, K), s / math.sqrt(D)),
             (("layers", "attn", "w_k_LDGK"), (L, D, G, K), s / math.sqrt(D)),
             (("layers", "attn", "w_v_LDGK"), (L, D, G, K), s / math.sqrt(D)),
             (("layers", "attn", "w_o_LHKD"), (L, H, K, D), out_s / math.sqrt(H * K)),
             (("layers", "mlp", "w_gate_LDF"), (L, D, F), s / math.sqrt(D)),
             (("layers", "mlp", "w_up_LDF"), (L, D, F), s / math.sqrt(D)),
             (("layers", "mlp", "w_down_LFD"), (L, F, D), out_s / math.sqrt(F))]
    if not cfg.tie_embeddings:
        specs.append((("head", "w_DV"), (D, V), s / math.sqrt(D)))
    sizes = [math.prod(shape) for _, shape, _ in specs]
    z = nn.truncated_normal(key, (sum(sizes),), 1.0, jnp.float32)
    params: dict[str, Any] = {
        "layers": {"attn_norm": {"scale_LD": jnp.ones((L, D), pd)},
                   "mlp_norm": {"scale_LD": jnp.ones((L, D), pd)}},
        "final_norm": {"scale_D": jnp.ones((D,), pd)},
    }
    offset = 0
    for (path, shape, std), size in zip(specs, sizes, strict=True):
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = (z[offset:offset + size].reshape(shape) * std).astype(pd)
        offset += size
    if cfg.qk_norm:
        params["layers"]["attn"]["q_norm"] = {"scale_LK": jnp.ones((L, K), pd)}
        params["layers"]["attn"]["k_norm"] = {"scale_LK": jnp.ones((L, K), pd)}
    return params


def scale_init(params: dict[str, Any], init_scale: Array) -> dict[str, Any]:
    """``params`` made with ``init_scale=1`` → as if made with ``init_scale`` (a traced array, so a
    sweep can vary it per run): every random leaf — weights ``w_*`` and the table — scales by it."""
    def leaf(path, x):
        name = str(path[-1].key)
        return x * init_scale.astype(x.dtype) if name.startswith(("w_", "table_")) else x
    return jax.tree_util.tree_map_with_path(leaf, params)


# ---------------------------------------------------------------------------------------------------
# apply


def attention(q_BTHK: Array, k_BSGK: Array, v_BSGK: Array, *, segment_ids_BT: Array | None,
              impl: str) -> Array:
    """Causal grouped-query attention; the one place an attention implementation is chosen.

    ``impl="xla"`` uses ``jax.nn.dot_product_attention`` (GQA without repeating K/V per query head);
    ``impl="pallas"`` the flash-attention kernel. With ``segment_ids_BT`` a token attends only to
    earlier tokens of its own segment (packed documents).
    """
    if impl == "pallas":
        from pallas_kernels.flash_attention import flash_attention

        def kernel(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT):
            return flash_attention(q_BTHK, k_BSGK, v_BSGK, causal=True,
                                   segment_ids=segment_ids_BT, impl="pallas")
        # On a mesh the kernel runs on each device's batch rows and heads (kv heads split alike).
        return per_shard(kernel, ("BTHK", "BSGK", "BSGK", "BT"), "BTHK")(
            q_BTHK, k_BSGK, v_BSGK, segment_ids_BT)
    if impl != "xla":
        raise ValueError(f"attention impl {impl!r} is not available")
    mask = None if segment_ids_BT is None else nn.segment_mask(segment_ids_BT)
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask, is_causal=True,
                                        implementation="xla")


def _block(x_BTD: Array, p: dict[str, Any], sin_BTk: Array, cos_BTk: Array,
           segment_ids_BT: Array | None, cfg: TransformerConfig) -> Array:
    """One pre-norm block on un-stacked (single-layer) parameters ``p``."""
    dt = x_BTD.dtype
    p = constrain_params(p)  # FSDP: this layer's weights are gathered here, inside the scan
    x_BTD = constrain(x_BTD, "BTD")
    a = p["attn"]
    h_BTD = nn.rms_norm(x_BTD, p["attn_norm"]["scale_LD"], cfg.norm_eps)
    q_BTHK = jnp.einsum("btd,dhk->bthk", h_BTD, a["w_q_LDHK"].astype(dt))
    k_BTGK = jnp.einsum("btd,dgk->btgk", h_BTD, a["w_k_LDGK"].astype(dt))
    v_BTGK = jnp.einsum("btd,dgk->btgk", h_BTD, a["w_v_LDGK"].astype(dt))
    if "q_norm" in a:
        q_BTHK = nn.rms_norm(q_BTHK, a["q_norm"]["scale_LK"], cfg.norm_eps)
        k_BTGK = nn.rms_norm(k_BTGK, a["k_norm"]["scale_LK"], cfg.norm_eps)
    q_BTHK = constrain(nn.apply_rope(q_BTHK, sin_BTk, cos_BTk), "BTHK")
    k_BTGK = constrain(nn.apply_rope(k_BTGK, sin_BTk, cos_BTk), "BTGK")
    v_BTGK = constrain(v_BTGK, "BTGK")
    ctx_BTHK = attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT=segment_ids_BT,
                         impl=cfg.attention_impl)
    ctx_BTHK = checkpoint_name(ctx_BTHK, "attn_context")
    x_BTD = x_BTD + jnp.einsum("bthk,hkd->btd", ctx_BTHK, a["w_o_LHKD"].astype(dt))

    m = p["mlp"]
    h_BTD = nn.rms_norm(x_BTD, p["mlp_norm"]["scale_LD"], cfg.norm_eps)
    return x_BTD + nn.swiglu(h_BTD, m["w_gate_LDF"], m["w_up_LDF"], m["w_down_LFD"])


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "save_attention": jax.checkpoint_policies.save_only_these_names("attn_context"),
    }
    return jax.checkpoint(fn, policy=policies[policy])


def apply(params: dict[str, Any], tokens_BT: Array, cfg: TransformerConfig, *,
          segment_ids_BT: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Forward pass: ``tokens_BT`` int ids -> ``(logits_BTV float32, aux)``; ``aux`` is empty.

    ``segment_ids_BT`` (optional) restricts attention to tokens of the same packed document.
    """
    table_VD = constrain_params(params["embed"]["table_VD"], "VD")
    x_BTD = constrain(nn.embed(table_VD, tokens_BT, jnp.dtype(cfg.dtype)), "BTD")
    return apply_embedded(params, x_BTD, cfg, segment_ids_BT=segment_ids_BT)


def apply_embedded(params: dict[str, Any], x_BTD: Array, cfg: TransformerConfig, *,
                   segment_ids_BT: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The model after the embedding lookup: embedded inputs ``x_BTD`` -> ``(logits_BTV, aux)``."""
    dt = jnp.dtype(cfg.dtype)
    x_BTD = x_BTD.astype(dt)
    B, T, _ = x_BTD.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    sin_BTk, cos_BTk = nn.rope_sin_cos(positions_BT, cfg.k, cfg.rope_theta)

    def body(x_BTD, p):
        return _block(x_BTD, p, sin_BTk, cos_BTk, segment_ids_BT, cfg), None

    body = _remat(body, cfg.remat)
    if cfg.scan_layers:
        x_BTD, _ = jax.lax.scan(body, x_BTD, params["layers"])
    else:
        for i in range(cfg.n_layers):
            x_BTD, _ = body(x_BTD, jax.tree.map(lambda a, i=i: a[i], params["layers"]))

    x_BTD = nn.rms_norm(x_BTD, params["final_norm"]["scale_D"], cfg.norm_eps)
    if cfg.tie_embeddings:
        w_DV = params["embed"]["table_VD"].T
    else:
        w_DV = params["head"]["w_DV"]
    logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, w_DV.astype(dt),
                            preferred_element_type=jnp.float32)
    return constrain(logits_BTV, "BTV"), {}


# ---------------------------------------------------------------------------------------------------
# counting


def count_params(cfg: TransformerConfig) -> dict[str, int]:
    """Analytic parameter count: ``total``, ``embedding`` (the V×D table, plus the untied head),
    ``with_head`` (``non_embedding`` plus the V×D output head, tied or not: the N whose FLOPs ``6ND``
    counts — Porian et al. 2024) and
    ``non_embedding`` (everything else: blocks and the final norm), Kaplan et al.'s N."""
    D, L, H, G, K, F, V = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.k,
                           cfg.d_ff, cfg.vocab_size)
    attn = D * H * K + 2 * D * G * K + H * K * D + (2 * K if cfg.qk_norm else 0)
    mlp = 3 * D * F
    per_layer = attn + mlp + 2 * D
    embedding = V * D * (1 if cfg.tie_embeddings else 2)
    non_embedding = L * per_layer + D
    return {"total": embedding + non_embedding, "non_embedding": non_embedding,
            "embedding": embedding, "with_head": non_embedding + V * D}


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
    """
    D, L, H, G, K, F, V = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.k,
                           cfg.d_ff, cfg.vocab_size)
    proj = 2 * (D * H * K + 2 * D * G * K + H * K * D)
    mlp = 2 * 3 * D * F
    attn = 4 * seq_len * H * K * (0.5 if causal_attention else 1.0)
    forward = L * (proj + mlp + attn) + 2 * D * V
    return {"forward": float(forward), "training": float(3 * forward)}
