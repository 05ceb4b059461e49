"""The family table: one row per model family drives the shared invariants of tests/test_families.py.

A new family gets causality, document isolation, count ≡ tree, leaf-name letters, scan ≡ loop,
presets build, config round trip, bitwise-stable init and FLOPs ≡ XLA's cost analysis by adding a
row here. Shared helpers (``tree_allclose``, ``param_hash``, micro configs) live here too.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jscale import presets
from jscale.models import mamba
from jscale.models.mamba import MambaConfig
from jscale.models.moe import MoEConfig
from jscale.models.parscale import ParScaleConfig
from jscale.models.transformer import TransformerConfig, moe_layer_indices
from pallas_kernels.selective_scan import selective_scan_ref

#: The seed of the bitwise-stable-init check.
INIT_SEED = 7

#: Micro configs: a couple of seconds to compile on 2 CPU cores.
TRANSFORMER_MICRO = TransformerConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                      d_ff=64, max_seq_len=64)
#: The MoE micro: 4 experts of width 16, top-2, one shared expert, every loss and the bias update on.
MOE_MICRO = dataclasses.replace(TRANSFORMER_MICRO, moe=MoEConfig(
    n_experts=4, top_k=2, d_expert=16, n_shared_experts=1, load_balance_coeff=0.01,
    z_loss_coeff=1e-3, bias_update_rate=0.01))
MOE_AUX = frozenset({"load_balance_loss", "router_z_loss", "max_vio"})
#: The ParScale micro: 3 streams, 4 prefix tokens per stream and layer, over TRANSFORMER_MICRO.
PARSCALE_MICRO = ParScaleConfig(**{f.name: getattr(TRANSFORMER_MICRO, f.name)
                                   for f in dataclasses.fields(TransformerConfig)},
                                n_streams=3, n_prefix_tokens=4)
MAMBA_MICRO = MambaConfig(vocab_size=61, d_model=16, n_layers=2, d_state=4, scan_impl="xla",
                          scan_chunk=8)


def _sequential_scan(*args, impl=None, chunk=None, **kwargs):
    """The model's scan call, run by the sequential oracle (one ``lax.scan`` step per token)."""
    return selective_scan_ref(*args, **kwargs)


def _mamba_flops_setup(monkeypatch) -> None:
    monkeypatch.setattr(mamba, "selective_scan", _sequential_scan)


def _mamba_uncounted(cfg: MambaConfig) -> float:
    """The selective scan's own term, ``SCAN_FLOPS_PER_FN · F · N`` per layer and token (the Mamba
    paper's 9·B·L·D·N convention), which XLA cannot count: it counts a ``lax.scan`` body once, not
    per step, and its count of a fully unrolled recurrence depends on fusion (elementwise ops
    duplicated into several fusions count in each: 7.6–20 FLOPs per (f, n) per step measured). So
    XLA's count is compared with the analytic count less that term: every matmul, the conv and the
    LM head (the parts counted by formula) are checked; the scan's elementwise remainder (one step
    of it) and the uncounted norms and activations are inside ``FLOPS_VS_XLA_RTOL``."""
    return cfg.n_layers * mamba.SCAN_FLOPS_PER_FN * cfg.d_inner * cfg.d_state


def _moe_uncounted(cfg: TransformerConfig) -> float:
    """Minus the routed experts' FLOPs XLA counts beyond the active ones: on CPU ``ragged_dot`` is
    lowered to one dense matmul of the rows (masked to their group) against **all E** experts'
    weights stacked, ``[M, E·K] × [E·K, N]``, so XLA counts ``E ×`` the grouped matmul's
    ``2·M·K·N`` — ``(E − 1) · top_k · 2·3·D·d_expert`` per token per MoE layer more than the active
    count (the masking's elementwise ops, ~2/N of a matmul, are inside ``FLOPS_VS_XLA_RTOL``). The
    router, the shared experts and everything dense are compared as they are."""
    m = cfg.moe
    return -(len(moe_layer_indices(cfg)) * (m.n_experts - 1) * m.top_k * 2 * 3 * cfg.d_model
             * cfg.d_expert)


def _moe_inactive(tree: Any, cfg: TransformerConfig) -> int:
    """Parameters of the routed experts a token is not sent to, from the tree: ``(E − k)/E`` of
    every ``w_*_LE..`` expert leaf."""
    m = cfg.moe
    expert = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
                 if str(path[-1].key).rsplit("_", 1)[-1].startswith("LE"))
    return expert * (m.n_experts - m.top_k) // m.n_experts


@dataclasses.dataclass(frozen=True)
class Row:
    """One family's entry.

    Attributes:
      name: the row's id (the registry name unless ``family`` is given).
      micro: a micro config (every shared invariant runs on it).
      variants: more configs (optional leaves, other shapes) for count ≡ tree and leaf names.
      seq_len: T of the invariant tests (odd lengths catch chunking edge cases).
      flops_cfgs: configs whose analytic forward FLOPs are checked against XLA's cost analysis
        (layers unrolled; ``flops_overrides`` applied).
      flops_overrides: config fields set for the FLOP check (e.g. the XLA scan).
      flops_setup: patches the FLOP check needs (``monkeypatch -> None``), or ``None``.
      flops_uncounted: per-token FLOPs the analytic count includes but XLA cannot see.
      init_sha256: :func:`param_hash` of ``micro`` initialized from ``PRNGKey(INIT_SEED)``: the init is
        bitwise stable (recorded before the shared scaffold replaced the per-family inits; change
        it only with a deliberate change of the init).
      describe: the ``jscale presets`` shape summary of ``micro``.
      notes: tolerances and caveats.
      family: the registry name, when several rows share a family (default: ``name``).
      matches: which configs of the family belong to this row (presets are assigned by it).
      aux_keys: the aux keys the family's forward pass reports.
      stateful: whether the model has non-gradient model state.
      inactive: ``(abstract params, cfg) -> int``, parameters a token does not use (``total −
        active``), counted from the tree.
    """

    name: str
    micro: Any
    variants: tuple[Any, ...]
    seq_len: int
    flops_cfgs: tuple[Any, ...]
    flops_overrides: dict[str, Any]
    flops_setup: Callable[[Any], None] | None
    flops_uncounted: Callable[[Any], float]
    init_sha256: str
    describe: str
    notes: str = ""
    family: str = ""
    matches: Callable[[Any], bool] = lambda cfg: True
    aux_keys: frozenset[str] = frozenset()
    stateful: bool = False
    inactive: Callable[[Any, Any], int] = lambda tree, cfg: 0

    def __post_init__(self):
        if not self.family:
            object.__setattr__(self, "family", self.name)


FAMILIES = [
    Row(name="transformer", micro=TRANSFORMER_MICRO,
        variants=(dataclasses.replace(TRANSFORMER_MICRO, qk_norm=True),
                  dataclasses.replace(TRANSFORMER_MICRO, tie_embeddings=False),
                  dataclasses.replace(TRANSFORMER_MICRO, head_dim=16),
                  dataclasses.replace(TRANSFORMER_MICRO, n_kv_heads=1),
                  dataclasses.replace(TRANSFORMER_MICRO, qkv_bias=True)),
        seq_len=12,
        flops_cfgs=(dataclasses.replace(TRANSFORMER_MICRO, d_model=128, n_heads=4, d_ff=384,
                                        vocab_size=257),
                    dataclasses.replace(TRANSFORMER_MICRO, d_model=128, n_heads=8, n_kv_heads=8,
                                        d_ff=256, vocab_size=257, qk_norm=True)),
        flops_overrides={}, flops_setup=None, flops_uncounted=lambda cfg: 0.0,
        init_sha256="e05088718b3a5b53c0d9f40fc1f65989ba1aba7f1e9e82f96f9c17342ade224e",
        describe="d_model=32 n_layers=2 n_heads=4 n_kv_heads=2 d_ff=64",
        notes="F32_REORDER for scan ≡ loop; XLA also counts norms/softmax/RoPE: FLOPS_VS_XLA_RTOL.",
        matches=lambda cfg: cfg.moe is None),
    Row(name="transformer-moe", family="transformer", micro=MOE_MICRO,
        variants=(dataclasses.replace(MOE_MICRO, moe=dataclasses.replace(
                      MOE_MICRO.moe, first_dense_layers=1, n_shared_experts=0,
                      router="topk_softmax")),
                  dataclasses.replace(MOE_MICRO, n_layers=4, tie_embeddings=False,
                                      moe=dataclasses.replace(MOE_MICRO.moe, first_dense_layers=1,
                                                              every=2, capacity_factor=1.25)),
                  dataclasses.replace(MOE_MICRO, moe=dataclasses.replace(
                      MOE_MICRO.moe, n_experts=1, top_k=1, d_expert=None, n_shared_experts=0))),
        seq_len=12,
        flops_cfgs=(dataclasses.replace(MOE_MICRO, d_model=128, n_heads=4, d_ff=384, vocab_size=257,
                                        moe=dataclasses.replace(MOE_MICRO.moe, d_expert=128)),
                    dataclasses.replace(MOE_MICRO, d_model=128, n_heads=8, n_kv_heads=8, d_ff=256,
                                        vocab_size=257, n_layers=3,
                                        moe=MoEConfig(n_experts=8, top_k=1, d_expert=64,
                                                      first_dense_layers=1, every=2))),
        flops_overrides={}, flops_setup=None, flops_uncounted=_moe_uncounted,
        init_sha256="ec51d24735d2776ee80fd73110bd1eaf3d8dfb0ef9018a96f3011cbcd772d63e",
        describe="d_model=32 n_layers=2 n_heads=4 n_kv_heads=2 d_ff=64 moe: n_experts=4 top_k=2 "
                 "d_expert=16 shared=1 layers=2",
        notes="dropless (per-token: causal); the FLOP check counts ragged_dot's CPU lowering "
              "(E × the active experts, _moe_uncounted).",
        matches=lambda cfg: cfg.moe is not None, aux_keys=MOE_AUX, stateful=True,
        inactive=_moe_inactive),
    Row(name="parscale", micro=PARSCALE_MICRO,
        variants=(dataclasses.replace(PARSCALE_MICRO, n_streams=1),
                  dataclasses.replace(PARSCALE_MICRO, n_streams=2, tie_embeddings=False,
                                      qkv_bias=True, n_prefix_tokens=1, smoothing=0.0),
                  dataclasses.replace(PARSCALE_MICRO, head_dim=16, n_kv_heads=1),
                  dataclasses.replace(PARSCALE_MICRO, n_layers=3, moe=MoEConfig(
                      n_experts=4, top_k=2, d_expert=16, first_dense_layers=1, every=2))),
        seq_len=12,
        flops_cfgs=(dataclasses.replace(PARSCALE_MICRO, d_model=128, n_heads=2, n_kv_heads=1,
                                        d_ff=384, vocab_size=257, n_prefix_tokens=16),
                    dataclasses.replace(PARSCALE_MICRO, d_model=128, n_heads=2, n_kv_heads=2,
                                        d_ff=256, vocab_size=257, n_streams=2, qkv_bias=True)),
        flops_overrides={}, flops_setup=None, flops_uncounted=lambda cfg: 0.0,
        init_sha256="c7f665eab2250035e32dffe975b3feb043ad5c7be90ef84a44f504d2897ac30a",
        describe="d_model=32 n_layers=2 n_heads=4 n_kv_heads=2 d_ff=64 n_streams=3 "
                 "n_prefix_tokens=4",
        notes="P streams of the transformer micro; the attention softmax over prefix + causal "
              "keys and the aggregation (elementwise, ~11 XLA FLOPs per score, uncounted) are "
              "inside FLOPS_VS_XLA_RTOL with head dim 64 (5.3 % at head dim 32).",
        aux_keys=frozenset({"stream_weight_max"}),
        inactive=lambda tree, cfg: 0 if cfg.moe is None else _moe_inactive(tree, cfg)),
    Row(name="mamba", micro=MAMBA_MICRO,
        variants=(dataclasses.replace(MAMBA_MICRO, bias=True, conv_bias=False),
                  dataclasses.replace(MAMBA_MICRO, tie_embeddings=False, dt_rank=3, expand=3,
                                      d_conv=2)),
        seq_len=13,
        flops_cfgs=(presets.get("mamba-tiny").model,
                    dataclasses.replace(presets.get("mamba-tiny").model, tie_embeddings=False,
                                        bias=True, conv_bias=False, dt_rank=12, expand=3, d_conv=3,
                                        d_state=8)),
        flops_overrides={"scan_impl": "xla"}, flops_setup=_mamba_flops_setup,
        flops_uncounted=_mamba_uncounted,
        init_sha256="2a1393ef4d4adfa6695a33e24895819f848978c41c9cbd8e5705f8a5b5ccf9d3",
        describe="d_model=16 n_layers=2 d_state=4 expand=2",
        notes="the XLA scan (chunked associative) ≡ the loop within F32_REORDER; the FLOP check "
              "runs the sequential oracle scan and leaves out the scan's own term."),
]

ROWS = {row.name: row for row in FAMILIES}


def row_of(cfg: Any) -> Row:
    """The row a model config belongs to (its family's row that ``matches`` it)."""
    from jscale import models
    name = models.family_of(cfg).name
    return next(r for r in FAMILIES if r.family == name and r.matches(cfg))


def tree_allclose(a: Any, b: Any, **tol) -> None:
    """Assert two pytrees have the same structure and allclose leaves (``tol``: rtol/atol)."""
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a),
                                                            jax.tree.structure(b))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def param_hash(params: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes, in path order."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params),
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        x = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{x.dtype}|{x.shape}|".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()
