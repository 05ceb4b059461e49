"""Optimizers from config: AdamW with warmup + cosine / WSD / constant, clipping and a decay mask
(matrices decay; norm scales, biases, and by default the embedding and the LM head do not).

The peak learning rate, weight decay, warmup length and schedule length are *injected*
hyperparameters (``optax.inject_hyperparams``): they live as arrays in the optimizer state, so a sweep
can ``vmap`` one optimizer over runs whose values differ (``state.hyperparams["learning_rate"]`` of
shape ``[R]``) without recompiling.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jscale.config import OptimConfig

Array = jax.Array


def schedule_factor(step: Array, *, schedule: str, warmup_steps: Array, total_steps: Array,
                    min_lr_ratio: float, decay_fraction: float) -> Array:
    """Learning-rate multiplier in [0, 1] for the update with 0-based index ``step``.

    Warmup rises linearly to 1 at update ``warmup_steps - 1``. Then ``cosine`` decays to
    ``min_lr_ratio`` at the last update (``total_steps - 1``); ``wsd`` stays at 1 and decays linearly to
    ``min_lr_ratio`` over the last ``decay_fraction · total_steps`` updates; ``constant`` stays at 1.
    """
    step = jnp.asarray(step, jnp.float32)
    warmup = jnp.asarray(warmup_steps, jnp.float32)
    total = jnp.asarray(total_steps, jnp.float32)
    warm = jnp.where(warmup > 0, jnp.minimum(1.0, (step + 1) / jnp.maximum(warmup, 1.0)), 1.0)
    if schedule == "constant":
        after = jnp.ones_like(step)
    elif schedule == "cosine":
        progress = jnp.clip((step - warmup + 1) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
        after = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    elif schedule == "wsd":
        decay_steps = jnp.maximum(jnp.round(decay_fraction * total), 1.0)
        progress = jnp.clip((step - (total - decay_steps) + 1) / decay_steps, 0.0, 1.0)
        after = 1.0 - (1.0 - min_lr_ratio) * progress
    else:
        raise ValueError(f"optim.schedule: unknown schedule {schedule!r}")
    return jnp.where(step < warmup, warm, after)


#: Top-level parameter key of an untied LM head (``params["head"]["w_DV"]``); a tied head has none.
HEAD_KEY = "head"


def decay_mask(params: Any, *, decay_embeddings: bool, decay_head: bool = False) -> Any:
    """``True`` for leaves that get weight decay, derived from leaf names: matrices (``w_*``) except
    the untied LM head (under ``params["head"]``), which decays only if ``decay_head``; embeddings
    (``table_*``) only if ``decay_embeddings`` — a tied head *is* the embedding table, so it follows
    that flag; never norm scales (``scale_*``) or biases (``b_*``)."""

    def leaf_decays(path, _):
        name = str(path[-1].key)
        if getattr(path[0], "key", None) == HEAD_KEY:
            return decay_head and name.startswith("w_")
        return name.startswith("w_") or (decay_embeddings and name.startswith("table_"))

    return jax.tree_util.tree_map_with_path(leaf_decays, params)


def _adamw(learning_rate, weight_decay, warmup_steps, total_steps, *, schedule, min_lr_ratio,
           decay_fraction, b1, b2, eps, grad_clip, decay_embeddings, decay_head):
    lr_fn = functools.partial(_lr, peak=learning_rate, schedule=schedule, warmup_steps=warmup_steps,
                              total_steps=total_steps, min_lr_ratio=min_lr_ratio,
                              decay_fraction=decay_fraction)
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()
    return optax.chain(
        clip,
        optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=functools.partial(decay_mask, decay_embeddings=decay_embeddings,
                                           decay_head=decay_head)))


def _lr(count, *, peak, **schedule_kw):
    return peak * schedule_factor(count, **schedule_kw)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW for ``total_steps`` updates as configured; hyperparameters injectable (see module doc)."""
    factory = functools.partial(
        _adamw, schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio,
        decay_fraction=cfg.decay_fraction, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        grad_clip=cfg.grad_clip, decay_embeddings=cfg.decay_embeddings, decay_head=cfg.decay_head)
    static = ("schedule", "min_lr_ratio", "decay_fraction", "b1", "b2", "eps", "grad_clip",
              "decay_embeddings", "decay_head")
    return optax.inject_hyperparams(factory, static_args=static)(
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_steps=jnp.asarray(cfg.warmup_steps, jnp.float32),
        total_steps=jnp.asarray(total_steps, jnp.float32))


def current_lr(opt_state: Any, step: Array, cfg: OptimConfig) -> Array:
    """The learning rate of the update with 0-based index ``step``, from the injected state."""
    hp = opt_state.hyperparams
    return _lr(step, peak=hp["learning_rate"], schedule=cfg.schedule,
               warmup_steps=hp["warmup_steps"], total_steps=hp["total_steps"],
               min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
