"""Named starting configurations, built by functions (not copied files).

``get(name)`` returns a fresh :class:`~jscale.config.RunConfig`; ``names()`` lists them. Override fields
with ``get("tiny").override({"optim.lr": 1e-3})`` or ``--set optim.lr=1e-3`` on the CLI.
"""

from __future__ import annotations

from collections.abc import Callable

from jscale.config import OptimConfig, RunConfig, TrainConfig
from jscale.models import MambaConfig, TransformerConfig
from jscale.models.moe import MoEConfig
from jscale.models.parscale import ParScaleConfig

_PRESETS: dict[str, Callable[[], RunConfig]] = {}


def preset(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    """Register ``fn`` as the preset named after it (underscores become dashes)."""
    _PRESETS[fn.__name__.replace("_", "-")] = fn
    return fn


@preset
def tiny() -> RunConfig:
    """~0.43 M parameters (D 128, 2 layers, GQA 4/2 heads), byte tokens, T 128, batch 16.

    100 steps take well under a minute on 2 CPU cores.
    """
    return RunConfig(
        model=TransformerConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384,
                                max_seq_len=512),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
        train=TrainConfig(steps=100, batch_size=16, seq_len=128, log_every=10, eval_every=50,
                          eval_batches=4, checkpoint_every=50),
    )


@preset
def small() -> RunConfig:
    """~3.5 M parameters (D 256, 4 layers, 4 heads of 64, F 768), byte tokens, T 256, batch 16."""
    return RunConfig(
        model=TransformerConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=768,
                                max_seq_len=1024),
        optim=OptimConfig(lr=2e-3, warmup_steps=50),
        train=TrainConfig(steps=1000, batch_size=16, seq_len=256, log_every=20, eval_every=200,
                          eval_batches=8, checkpoint_every=200),
    )


@preset
def mamba_tiny() -> RunConfig:
    """~0.5 M parameters: Mamba-1 (D 128, 4 layers, N 16, expand 2), byte tokens, T 128, batch 16.

    A Mamba block has ~6·D² parameters, a transformer layer ~12·D²: twice the layers of ``tiny``.
    """
    return RunConfig(
        model=MambaConfig(d_model=128, n_layers=4, d_state=16, d_conv=4, expand=2),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
        train=TrainConfig(steps=100, batch_size=16, seq_len=128, log_every=10, eval_every=50,
                          eval_batches=4, checkpoint_every=50),
    )


@preset
def mamba_small() -> RunConfig:
    """~3.6 M parameters: Mamba-1 (D 256, 8 layers, N 16, expand 2), byte tokens, T 256, B 16."""
    return RunConfig(
        model=MambaConfig(d_model=256, n_layers=8, d_state=16, d_conv=4, expand=2),
        optim=OptimConfig(lr=2e-3, warmup_steps=50),
        train=TrainConfig(steps=1000, batch_size=16, seq_len=256, log_every=20, eval_every=200,
                          eval_batches=8, checkpoint_every=200),
    )


@preset
def moe_tiny() -> RunConfig:
    """``tiny`` with an MoE FFN in both layers: 8 experts of width 128, top-2, one shared expert
    (a token's FFN is 3 × 128 wide, ``tiny``'s d_ff 384), aux-loss-free bias balancing on.

    ~1.02 M parameters in all, ~0.43 M active (``tiny``: 0.43 M).
    """
    return RunConfig(
        model=TransformerConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384,
                                max_seq_len=512,
                                moe=MoEConfig(n_experts=8, top_k=2, d_expert=128,
                                              n_shared_experts=1, load_balance_coeff=0.01,
                                              z_loss_coeff=1e-3, bias_update_rate=1e-3)),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
        train=TrainConfig(steps=100, batch_size=16, seq_len=128, log_every=10, eval_every=50,
                          eval_batches=4, checkpoint_every=50),
    )


@preset
def moe_small() -> RunConfig:
    """``small`` with MoE FFNs after one dense layer: 16 experts of width 256, top-2, one shared
    expert (a token's FFN is 3 × 256 wide, ``small``'s d_ff 768), bias balancing on.

    ~11.7 M parameters in all, ~3.49 M active (``small``: 3.48 M).
    """
    return RunConfig(
        model=TransformerConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=768,
                                max_seq_len=1024,
                                moe=MoEConfig(n_experts=16, top_k=2, d_expert=256,
                                              n_shared_experts=1, first_dense_layers=1,
                                              load_balance_coeff=0.01, z_loss_coeff=1e-3,
                                              bias_update_rate=1e-3)),
        optim=OptimConfig(lr=2e-3, warmup_steps=50),
        train=TrainConfig(steps=1000, batch_size=16, seq_len=256, log_every=20, eval_every=200,
                          eval_batches=8, checkpoint_every=200),
    )


@preset
def parscale_tiny() -> RunConfig:
    """``tiny`` run as 4 ParScale streams (16 prefix tokens per stream and layer, ε 0.01).

    ~0.43 M backbone parameters, +16 K prefix and +66 K aggregator parameters; each step runs the
    stack on 4× the rows.
    """
    return RunConfig(
        model=ParScaleConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384,
                             max_seq_len=512, n_streams=4, n_prefix_tokens=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
        train=TrainConfig(steps=100, batch_size=16, seq_len=128, log_every=10, eval_every=50,
                          eval_batches=4, checkpoint_every=50),
    )


def names() -> list[str]:
    """Names of all presets."""
    return sorted(_PRESETS)


def get(name: str) -> RunConfig:
    """A fresh :class:`RunConfig` for preset ``name``; unknown names list the valid ones."""
    try:
        return _PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(names())}") from None
