"""Mamba-1 (selective state-space) language model: its config, its family object and recurrent decode.

Token embedding → ``n_layers`` pre-norm residual blocks ``x + Mamba(RMSNorm(x))`` → final RMSNorm →
LM head (tied or not), on the shared scaffold (:mod:`jscale.models.lm`) with one part per block, the
mixer :class:`~jscale.models.parts.mamba_mixer.MambaMixer` (``layers.mixer``, pre-norm
``layers.norm``): ``Mamba`` of state-spaces/mamba ``mamba_ssm/modules/mamba_simple.py``. Packed
documents (``segment_ids_BT``) are isolated: conv and scan state do not cross a document boundary.

Letters (the glossary of :mod:`jscale.nn`): D model width, F inner width ``expand · d_model`` (the
block's expanded width, like an FFN's), N SSM state (``d_state``), J Δ rank (``dt_rank``), W conv
width (``d_conv``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jscale import nn, registry
from jscale.config import ConfigError, check
from jscale.models import lm
from jscale.models.lm import DTYPES
from jscale.models.parts.mamba_mixer import (  # noqa: F401  (re-exported)
    SCAN_FLOPS_PER_FN,
    MambaMixer,
    causal_conv,
)
from pallas_kernels.selective_scan import selective_scan

Array = jax.Array
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
      dt_rank: J, rank of the Δ projection; ``"auto"`` means ``ceil(d_model / 16)``.
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
        """J, the resolved ``dt_rank``."""
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank


# --------------------------------------------------------------------------------------------------
# the family


def _scan(*args, **kwargs):
    # Resolved here at call time, so patching this module's ``selective_scan`` reaches the model.
    return selective_scan(*args, **kwargs)


def mixer_part(cfg: MambaConfig) -> MambaMixer:
    """The block's mixer part for ``cfg``."""
    return MambaMixer(d_model=cfg.d_model, d_inner=cfg.d_inner, d_state=cfg.d_state,
                      dt_rank=cfg.rank, d_conv=cfg.d_conv, dt_min=cfg.dt_min, dt_max=cfg.dt_max,
                      dt_init_floor=cfg.dt_init_floor, dt_scale=cfg.dt_scale,
                      conv_bias=cfg.conv_bias, bias=cfg.bias, scan_impl=cfg.scan_impl,
                      scan_chunk=cfg.scan_chunk, init_scale=cfg.init_scale,
                      out_div=math.sqrt(cfg.n_layers), scan_fn=_scan)


@functools.lru_cache(maxsize=256)
def spec(cfg: MambaConfig) -> lm.LMSpec:
    """The scaffold's description of ``cfg``: one mixer per block (init as in ``mamba_simple``; the
    in/x projections and the embedding truncated normal with std ``init_scale / sqrt(fan_in)``,
    out_proj further ``/ sqrt(n_layers)``, the prenorm-residual rescale)."""
    return lm.LMSpec(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                     norm_eps=cfg.norm_eps, tie_embeddings=cfg.tie_embeddings,
                     init_scale=cfg.init_scale, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     remat=cfg.remat, scan_layers=cfg.scan_layers,
                     block=(lm.Sublayer("mixer", "norm", mixer_part(cfg)),))


def mixer(h_BTD: Array, m: dict[str, Array], cfg: MambaConfig, *,
          segment_ids_BT: Array | None = None) -> Array:
    """The Mamba mixer on one layer's parameters ``m`` (names without ``L``): ``[B, T, D] -> [B, T, D]``."""
    return mixer_part(cfg).mix(m, h_BTD, segment_ids_BT=segment_ids_BT)


def flops_per_token(cfg: MambaConfig, seq_len: int) -> dict[str, float]:
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
    count (tests/families.py says why).
    """
    return lm.flops_per_token(spec(cfg), seq_len)


class MambaFamily(lm.LMFamily):
    """The Mamba-1 family (see :class:`jscale.models.protocol.Family`)."""

    name = "mamba"
    config_cls = MambaConfig

    def spec(self, cfg: MambaConfig) -> lm.LMSpec:
        return spec(cfg)

    def shape_step(self, base_model: MambaConfig, *, head_dim: int | None,
                   ffn_ratio: float | None) -> tuple[int, Any]:
        """Widths in multiples of ``head_dim`` (default 64); only ``n_layers`` and ``d_model`` change
        (the inner width follows ``expand``)."""
        if ffn_ratio is not None:
            raise ConfigError("shape_for_params: ffn_ratio does not apply to Mamba (its inner width "
                             "is model.expand × d_model)")

        def shaped(n_layers: int, d_model: int) -> MambaConfig:
            return dataclasses.replace(base_model, n_layers=n_layers, d_model=d_model)
        return head_dim or 64, shaped

    def describe(self, cfg: MambaConfig) -> str:
        return f"d_model={cfg.d_model} n_layers={cfg.n_layers} d_state={cfg.d_state} expand={cfg.expand}"

    def dim_fields(self, cfg: MambaConfig) -> dict[str, str]:
        return {**super().dim_fields(cfg), "F": "the FFN / inner width (model.expand × model.d_model)",
                "N": "model.d_state", "J": "model.dt_rank", "W": "model.d_conv"}

    def max_seq_len(self, cfg: MambaConfig) -> None:
        return None

    def decode_init(self, params: dict[str, Any], cfg: MambaConfig, batch_size: int,
                    max_len: int) -> dict[str, Array]:
        """:func:`init_state` (recurrent: O(1) in the length, so ``max_len`` bounds nothing)."""
        return init_state(cfg, batch_size)

    def decode_step(self, params: dict[str, Any], token_B: Array, cache: dict[str, Array],
                    cfg: MambaConfig, *, model_state: Any = None) -> tuple[Array, dict[str, Array]]:
        """:func:`step` (Mamba has no model state)."""
        return step(params, token_B, cache, cfg)


FAMILY = registry.register(MambaFamily())


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
    Feeding a sequence one token at a time from :func:`init_state` gives the full pass's logits.
    """
    s, part = spec(cfg), mixer_part(cfg)
    x_BD = nn.embed(params["embed"]["table_VD"], token_B, jnp.dtype(cfg.dtype))

    def body(x_BD, layer):
        p, conv_BWF, ssm_BFN = layer
        p = nn.unstack_names(p)
        h_BD = nn.rms_norm(x_BD, p["norm"]["scale_D"], cfg.norm_eps)
        out_BD, conv_BWF, ssm_BFN = part.step(p["mixer"], h_BD, conv_BWF, ssm_BFN)
        return x_BD + out_BD, (conv_BWF, ssm_BFN)

    x_BD, (conv, ssm) = jax.lax.scan(body, x_BD, (params["layers"], state["conv_LBWF"],
                                                  state["ssm_LBFN"]))
    x_BD = nn.rms_norm(x_BD, params["final_norm"]["scale_D"], cfg.norm_eps)
    return lm.logits(params, x_BD, s), {"conv_LBWF": conv, "ssm_LBFN": ssm}
