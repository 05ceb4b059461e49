"""ParScale: ``P`` parallel streams of one transformer, learned per-stream prefixes, dynamic aggregation.

Chen et al., "Parallel Scaling Law for Language Models" (arXiv 2505.10475; official code
QwenLM/ParScale, ``modeling_qwen2_parscale.py``), composed over the dense transformer
(:mod:`jscale.models.transformer`; MoE layers too) without changing it:

1. The token embeddings are replicated ``P`` times, stream-major: the scaffold sees ``P·B`` rows, row
   ``p·B + b`` is stream ``p`` of sequence ``b`` (the official ``(n b) s h`` layout).
2. Every attention sub-layer has learned prefix keys/values ``prefix_k``/``prefix_v``, one
   ``[P, G, S, K]`` block per layer (``S = n_prefix_tokens``; GQA's ``G`` kv heads): raw keys/values
   — no projection, **no RoPE** — that every query of stream ``p`` sees before its causal past
   (and across packed-document boundaries); real tokens keep positions ``0..T−1``. They live at
   ``params["prefix"][stack][sublayer]["prefix_k_LPGSK"]`` and reach the attention part as the
   scaffold's layer inputs (:mod:`jscale.models.lm`), per stream (the part repeats them over the
   stream's rows: :func:`jscale.models.parts.attention.prefix_rows`).
3. On each stream's **final-norm** hidden states, the aggregator: its input is the ``P`` states
   interleaved **h-major** — feature ``j`` of stream ``p`` at column ``j·P + p`` (the official
   ``rearrange("(n b) s h -> b s (h n)")``), so released checkpoints load one-to-one — then
   ``Linear(P·D→D, bias) → SiLU → Linear(D→P, bias) → softmax over P`` (float32), smoothed
   ``w·(1−ε) + ε/P`` (``ε = smoothing``: label smoothing of the aggregation weights, the official
   ``parscale_attn_smooth``; every weight lies in ``[ε/P, 1−ε+ε/P]``), and the weighted sum of the
   ``P`` hidden states goes to the one shared LM head. The loss is ordinary next-token
   cross-entropy on those logits.

Leaves: the transformer's, plus ``prefix`` (above) and ``aggregator``: ``w_in_DPD`` (``[D, P, D]``:
the first Linear's ``[P·D, D]`` weight with its input axis split ``(j, p)`` — the h-major column
``j·P + p`` is ``w_in_DPD[j, p]``), ``b_in_D``, ``w_out_DP``, ``b_out_P``.

``n_streams = 1`` is the base transformer exactly: no prefixes, no aggregator, the same parameter
tree, init (same key → same parameters), logits and gradients.

**Init** (the official code leaves the prefixes as uninitialised memory). The base parameters are
drawn from the key exactly as the transformer's (so a ParScale model and its dense base made with
one seed share their backbone); the new leaves from ``fold_in(key, 1)``: prefixes truncated normal
with std ``init_scale`` — the scale of a real key or value at init (an RMS-normed input through a
``1/sqrt(D)``-std projection) — different per stream, so the streams differ from the first step;
``w_in_DPD`` truncated normal with std ``init_scale / sqrt(P·D)``; ``w_out_DP`` and both biases
zero, so the aggregation starts as the plain mean of the streams (weights exactly ``1/P``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jscale import nn, registry
from jscale.config import check
from jscale.models import decode, lm, transformer
from jscale.models.parts.attention import Attention
from jscale.models.transformer import TransformerConfig, TransformerFamily
from jscale.sharding import constrain

Array = jax.Array

#: The trainable group of the frozen-backbone variant (``train.trainable=parscale``).
NEW_KEYS = ("prefix", "aggregator")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParScaleConfig(TransformerConfig):
    """A transformer run as ``n_streams`` parallel streams (every :class:`TransformerConfig` field,
    plus the three below).

    Attributes:
      n_streams: P, parallel streams; 1 is the base transformer exactly.
      n_prefix_tokens: learned prefix keys/values per stream per attention layer (the official
        default, 48).
      smoothing: ε, label smoothing of the aggregation weights, ``w·(1−ε) + ε/P`` (the official
        config's ``parscale_attn_smooth`` = 0.01); in ``[0, 1)``.
    """

    n_streams: int = 1
    n_prefix_tokens: int = 48
    smoothing: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.n_streams, int) and self.n_streams >= 1, "model.n_streams",
              "must be an integer >= 1 (1 is the base model)", self.n_streams)
        check(self.n_prefix_tokens >= 0, "model.n_prefix_tokens", "must be >= 0",
              self.n_prefix_tokens)
        check(0.0 <= self.smoothing < 1.0, "model.smoothing",
              "must be in [0, 1) (label smoothing of the aggregation weights)", self.smoothing)

    @property
    def base(self) -> TransformerConfig:
        """The dense transformer every stream runs (this config without the ParScale fields)."""
        return TransformerConfig(**{f.name: getattr(self, f.name)
                                    for f in dataclasses.fields(TransformerConfig)})


def attention_sublayers(cfg: ParScaleConfig) -> list[tuple[str, str, Attention]]:
    """``(stack key, sub-layer name, part)`` of every attention sub-layer, in model order."""
    return [(st.key, sub.name, sub.part) for st in transformer.spec(cfg.base).layer_stacks
            for sub in st.block if isinstance(sub.part, Attention)]


def _layers_of(cfg: ParScaleConfig) -> dict[str, int]:
    return {st.key: st.n_steps for st in transformer.spec(cfg.base).layer_stacks}


def init_new(key: Array, cfg: ParScaleConfig) -> dict[str, Any]:
    """The ParScale leaves (``{"prefix": ..., "aggregator": ...}``) drawn from ``key`` (see the module
    docstring; one truncated-normal draw serves every random leaf, laid end to end in model order,
    then ``w_in_DPD``); ``{}`` when ``n_streams == 1``."""
    P, D, S, s = cfg.n_streams, cfg.d_model, cfg.n_prefix_tokens, cfg.init_scale
    if P == 1:
        return {}
    pd = jnp.dtype(cfg.param_dtype)
    steps = _layers_of(cfg)
    normal = []  # (path, shape, std)
    for stack, name, part in attention_sublayers(cfg):
        shape = (steps[stack], P, part.n_kv_heads, S, part.head_dim)
        normal += [(("prefix", stack, name, f"prefix_{kv}_LPGSK"), shape, s) for kv in "kv"]
    normal.append((("aggregator", "w_in_DPD"), (D, P, D), s / math.sqrt(P * D)))
    z = nn.truncated_normal(key, (sum(math.prod(shape) for _, shape, _ in normal),), 1.0,
                            jnp.float32)
    out: dict[str, Any] = {"aggregator": {"b_in_D": jnp.zeros((D,), pd),
                                          "w_out_DP": jnp.zeros((D, P), pd),
                                          "b_out_P": jnp.zeros((P,), pd)}}
    offset = 0
    for path, shape, std in normal:
        size = math.prod(shape)
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = (z[offset:offset + size].reshape(shape) * std).astype(pd)
        offset += size
    return out


def aggregate(params: dict[str, Any], h_PBTD: Array, smoothing: float) -> tuple[Array, Array]:
    """The ``P`` streams' final-norm hidden states → ``(h_BTD, weights_BTP)``: the weighted sum and
    its smoothed aggregation weights (float32; see the module docstring)."""
    a = params["aggregator"]
    P, dt = h_PBTD.shape[0], h_PBTD.dtype
    # Linear(P·D → D) on the h-major interleave: column j·P + p is w_in_DPD[j, p].
    z_BTD = jnp.einsum("pbtd,dpe->bte", h_PBTD, a["w_in_DPD"].astype(dt)) + a["b_in_D"].astype(dt)
    logits_BTP = (jnp.einsum("bte,ep->btp", jax.nn.silu(z_BTD), a["w_out_DP"].astype(dt))
                  + a["b_out_P"].astype(dt))
    w_BTP = jax.nn.softmax(logits_BTP.astype(jnp.float32), axis=-1)
    w_BTP = w_BTP * (1.0 - smoothing) + smoothing / P
    h_BTD = jnp.einsum("pbtd,btp->btd", h_PBTD.astype(jnp.float32), w_BTP).astype(dt)
    return constrain(h_BTD, "BTD"), w_BTP


def stream_inputs(params: dict[str, Any], cfg: ParScaleConfig) -> dict[str, Any]:
    """The scaffold's layer inputs carrying every attention layer's prefix in the compute dtype
    (``{stack: {sublayer: {"prefix_k_LPGSK", "prefix_v_LPGSK"}}}``; the single-stack form for a
    one-stack model)."""
    stacks = transformer.spec(cfg.base).layer_stacks
    dt = jnp.dtype(cfg.dtype)  # in the compute dtype, like the real keys and values
    prefix = jax.tree.map(lambda x: x.astype(dt), params["prefix"])
    return prefix[stacks[0].key] if len(stacks) == 1 else prefix


def count_new(cfg: ParScaleConfig) -> dict[str, int]:
    """Analytic counts of the ParScale leaves: ``prefix`` ``2·L·P·G·S·K`` (over the attention layers)
    and ``aggregator`` ``(P·D + 1)·D + (D + 1)·P``; zeros when ``n_streams == 1``."""
    P, D, S = cfg.n_streams, cfg.d_model, cfg.n_prefix_tokens
    if P == 1:
        return {"prefix": 0, "aggregator": 0}
    steps = _layers_of(cfg)
    prefix = sum(2 * steps[stack] * P * part.n_kv_heads * S * part.head_dim
                 for stack, _, part in attention_sublayers(cfg))
    return {"prefix": prefix, "aggregator": (P * D + 1) * D + (D + 1) * P}


def count_params(cfg: ParScaleConfig) -> dict[str, int]:
    """The base transformer's counts plus the prefixes and the aggregator, which are non-embedding
    (in ``non_embedding``, ``with_head``, ``total`` and ``active``: the paper's accounting)."""
    counts = transformer.count_params(cfg.base)
    extra = sum(count_new(cfg).values())
    return {k: v + (0 if k == "embedding" else extra) for k, v in counts.items()}


def flops_per_token(cfg: ParScaleConfig, seq_len: int, *,
                    causal_attention: bool = False) -> dict[str, float]:
    """Per token of the input: ``P×`` the base model's forward FLOPs without its LM head (every
    stream runs the whole stack), plus each stream's attention over its ``S`` prefix entries
    (``4·S·H·K`` per attention layer — the prefix is seen in full by every query), plus the
    aggregator (``2·(P·D·D + D·P)``), plus the LM head once (``2·D·V``). The base's conventions
    otherwise (:func:`jscale.models.transformer.flops_per_token`); ``training`` is 3× ``forward``."""
    base = transformer.flops_per_token(cfg.base, seq_len, causal_attention=causal_attention)
    P, D, S = cfg.n_streams, cfg.d_model, cfg.n_prefix_tokens
    if P == 1:
        return base
    head = 2 * D * cfg.vocab_size
    steps = _layers_of(cfg)
    prefix = sum(steps[stack] * 4 * S * part.n_heads * part.head_dim
                 for stack, _, part in attention_sublayers(cfg))
    forward = P * (base["forward"] - head + prefix) + 2 * (P * D * D + D * P) + head
    return {"forward": float(forward), "training": float(3 * forward)}


class ParScaleFamily(TransformerFamily):
    """The ParScale family (see :class:`jscale.models.protocol.Family` and the module docstring)."""

    name = "parscale"
    config_cls = ParScaleConfig

    def spec(self, cfg: ParScaleConfig) -> lm.LMSpec:
        return transformer.spec(cfg.base)

    def init(self, key: Array, cfg: ParScaleConfig) -> dict[str, Any]:
        params = lm.init(key, self.spec(cfg))
        return {**params, **init_new(jax.random.fold_in(key, 1), cfg)}

    def scale_init(self, params: dict[str, Any], init_scale: Array,
                   cfg: ParScaleConfig) -> dict[str, Any]:
        base = {k: v for k, v in params.items() if k not in NEW_KEYS}
        out = lm.scale_init(base, init_scale, self.spec(cfg))
        if cfg.n_streams > 1:
            out["prefix"] = jax.tree.map(lambda x: x * init_scale.astype(x.dtype),
                                         params["prefix"])
            agg = dict(params["aggregator"])
            agg["w_in_DPD"] = agg["w_in_DPD"] * init_scale.astype(agg["w_in_DPD"].dtype)
            out["aggregator"] = agg
        return out

    def hidden(self, params: dict[str, Any], x_BTD: Array, cfg: ParScaleConfig, *,
               segment_ids_BT: Array | None = None, model_state: Any = None,
               layer_inputs: Any = None) -> tuple[Array, dict[str, Array], Any]:
        """The ``P`` streams through the stack, then the aggregation; ``aux`` adds
        ``stream_weight_max`` (the mean over tokens of the largest aggregation weight: ``1/P`` is an
        even mix, ``1 − ε + ε/P`` one stream)."""
        spec = self.spec(cfg)
        P = cfg.n_streams
        if P == 1:
            return lm.hidden(params, x_BTD, spec, segment_ids_BT=segment_ids_BT,
                             model_state=model_state, layer_inputs=layer_inputs)
        if layer_inputs:
            raise ValueError("a ParScale model (n_streams > 1) makes its own layer inputs (the "
                             "prefixes); it takes none from the caller")
        B, T, D = x_BTD.shape
        x_BTD = constrain(jnp.tile(x_BTD, (P, 1, 1)), "BTD")  # stream-major rows p·B + b
        seg = None if segment_ids_BT is None else jnp.tile(segment_ids_BT, (P, 1))
        h, aux, new_state = lm.hidden(params, x_BTD, spec, segment_ids_BT=seg,
                                      model_state=model_state,
                                      layer_inputs=stream_inputs(params, cfg))
        h_BTD, w_BTP = aggregate(params, h.reshape(P, B, T, D), cfg.smoothing)
        return h_BTD, {**aux, "stream_weight_max": jnp.mean(jnp.max(w_BTP, axis=-1))}, new_state

    def decode_init(self, params: dict[str, Any], cfg: ParScaleConfig, batch_size: int,
                    max_len: int) -> Any:
        """A decode cache of ``P·batch_size`` stream-major rows with every attention layer's
        prefix pre-loaded into its first ``n_prefix_tokens`` slots (no RoPE), as the official
        ``ParscaleCache`` does; real token ``t`` then sits after them at RoPE position ``t``."""
        if cfg.n_streams == 1:
            return super().decode_init(params, cfg, batch_size, max_len)
        return decode.init_cache(self.spec(cfg), cfg.n_streams * batch_size, max_len,
                                 layer_inputs=stream_inputs(params, cfg))

    def decode_step(self, params: dict[str, Any], token_B: Array, cache: Any,
                    cfg: ParScaleConfig, *, model_state: Any = None) -> tuple[Array, Any]:
        """One token for every stream: the embedding tiled over the P streams, one scaffold step,
        the aggregation of the P final-norm states, the LM head once (≡ the full pass)."""
        P = cfg.n_streams
        if P == 1:
            return super().decode_step(params, token_B, cache, cfg, model_state=model_state)
        spec = self.spec(cfg)
        x_BD = lm.embed(params, token_B[:, None], spec)[:, 0]
        h_BD, cache = decode.hidden_step(params, jnp.tile(x_BD, (P, 1)), cache, spec,
                                         model_state=model_state)
        B = token_B.shape[0]
        h_1BD, _ = aggregate(params, h_BD.reshape(P, 1, B, -1), cfg.smoothing)
        return lm.logits(params, h_1BD[0], spec), cache

    def count_params(self, cfg: ParScaleConfig) -> dict[str, int]:
        return count_params(cfg)

    def flops_per_token(self, cfg: ParScaleConfig, seq_len: int) -> dict[str, float]:
        return flops_per_token(cfg, seq_len)

    def memory_bytes(self, cfg: ParScaleConfig, batch_size: int, seq_len: int) -> int:
        """The scaffold's estimate (:meth:`jscale.models.lm.LMFamily.memory_bytes`) with every
        stream's activations (``P×`` the rows through the layers; the logits once)."""
        tokens = batch_size * seq_len
        return 4 * (4 * self.count_params(cfg)["total"]
                    + 24 * cfg.n_streams * tokens * cfg.n_layers * cfg.d_model
                    + 2 * tokens * cfg.vocab_size)

    def param_groups(self, cfg: ParScaleConfig) -> dict[str, tuple[str, ...] | None]:
        """``all``, and (when ``n_streams > 1``) ``parscale``: only the prefixes and the aggregator
        (the paper's frozen-backbone variant)."""
        groups = super().param_groups(cfg)
        if cfg.n_streams > 1:
            groups["parscale"] = NEW_KEYS
        return groups

    def describe(self, cfg: ParScaleConfig) -> str:
        return (f"{super().describe(cfg)} n_streams={cfg.n_streams} "
                f"n_prefix_tokens={cfg.n_prefix_tokens}")

    def dim_fields(self, cfg: ParScaleConfig) -> dict[str, str]:
        return {**super().dim_fields(cfg), "P": "model.n_streams", "S": "model.n_prefix_tokens"}


FAMILY = registry.register(ParScaleFamily())
