"""G_random (jscale.growth.masked): the stored tree, the blend — exactly zero's model at m = 0, the
stored tree bitwise at m = 1, MSG's ``x + m·block(x)`` for new layers — and the blend as part of
training (one compile while m rises, the grown run's effective parameters per step)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import MAMBA_MICRO, MOE_MICRO, TRANSFORMER_MICRO
from tolerances import F32_REORDER

from jscale import core, growth, models, optim, presets
from jscale.config import OptimConfig

R = dataclasses.replace
KEY, GROW_KEY = jax.random.PRNGKey(0), jax.random.PRNGKey(3)
TOKENS_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, TRANSFORMER_MICRO.vocab_size)
WIDE = dict(d_model=64, n_heads=8, n_kv_heads=4)  # the head dim stays 8

PAIRS = {
    "depth": (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, n_layers=4)),
    "depth-moe": (MOE_MICRO, R(MOE_MICRO, n_layers=4)),
    "depth-mamba": (MAMBA_MICRO, R(MAMBA_MICRO, n_layers=6)),
    "d_ff": (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, d_ff=96)),
    "heads": (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, n_heads=8, n_kv_heads=4, head_dim=8)),
    "d_model": (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, **WIDE, d_ff=128)),
    "d_model-mamba": (MAMBA_MICRO, R(MAMBA_MICRO, d_model=24)),
}


def logits(params, cfg) -> np.ndarray:
    return np.asarray(models.forward(params, TOKENS_BT, cfg)[0])


@pytest.mark.parametrize("name", list(PAIRS))
def test_blend_at_zero_is_zero_growth_and_at_one_the_stored_tree(name):
    small_cfg, big_cfg = PAIRS[name]
    small = models.init(KEY, small_cfg)
    stored = growth.grow(small, small_cfg, big_cfg, "random", key=GROW_KEY)
    want = jax.eval_shape(lambda: models.init(KEY, big_cfg))
    assert jax.tree.structure(stored) == jax.tree.structure(want)
    assert all(x.shape == w.shape and x.dtype == w.dtype
               for x, w in zip(jax.tree.leaves(stored), jax.tree.leaves(want), strict=True))
    factors = growth.blend_factors(small_cfg, big_cfg)
    at_zero = growth.blend(stored, factors, 0.0)
    depth = big_cfg.n_layers != small_cfg.n_layers
    if not depth:  # the width blend at 0 is zero's tree, bitwise
        jax.tree.map(np.testing.assert_array_equal, at_zero,
                     growth.grow(small, small_cfg, big_cfg, "zero"))
    if name != "d_model" and name != "d_model-mamba":  # exact (d_model: up to the eps change)
        np.testing.assert_allclose(logits(at_zero, big_cfg), logits(small, small_cfg),
                                   **F32_REORDER)
    jax.tree.map(np.testing.assert_array_equal, growth.blend(stored, factors, 1.0), stored)
    # the new parameters are random, not zero: the blend at 1 computes another function
    assert np.abs(logits(stored, big_cfg) - logits(small, small_cfg)).max() > 1e-3


def test_random_keeps_the_small_entries_and_draws_the_new_ones():
    small_cfg, big_cfg = PAIRS["d_ff"]
    small = models.init(KEY, small_cfg)
    stored = growth.grow(small, small_cfg, big_cfg, "random", key=GROW_KEY)
    up = stored["layers"]["mlp"]["w_up_LDF"]
    np.testing.assert_array_equal(up[..., :64], small["layers"]["mlp"]["w_up_LDF"])
    fresh = models.init(GROW_KEY, big_cfg)["layers"]["mlp"]["w_up_LDF"]
    np.testing.assert_array_equal(up[..., 64:], fresh[..., 64:])
    # depth: new layers (interleaved after the layer they follow) are fresh draws whole
    d_small, d_big = PAIRS["depth"]
    s = models.init(KEY, d_small)
    grown = growth.grow(s, d_small, d_big, "random", key=GROW_KEY)["layers"]["attn"]["w_q_LDHK"]
    np.testing.assert_array_equal(grown[0::2], s["layers"]["attn"]["w_q_LDHK"])
    np.testing.assert_array_equal(grown[1::2], models.init(GROW_KEY, d_big)["layers"]["attn"][
        "w_q_LDHK"][1::2])
    with pytest.raises(ValueError, match="key="):
        growth.grow(small, small_cfg, big_cfg, "random")


def test_depth_blend_scales_only_the_new_layers_residual_outputs():
    """Every sub-layer's output is linear in its residual output projection (attention ``w_o``,
    SwiGLU ``w_down``): scaling exactly those of the new layers by m makes each new sub-layer
    ``x + m·block(x)`` (MSG's layer mask); everything else is untouched."""
    small_cfg, big_cfg = PAIRS["depth"]
    stored = growth.grow(models.init(KEY, small_cfg), small_cfg, big_cfg, "random", key=GROW_KEY)
    blended = growth.blend(stored, growth.blend_factors(small_cfg, big_cfg), 0.25)
    flat = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    for path, x in jax.tree_util.tree_flatten_with_path(blended)[0]:
        name = jax.tree_util.keystr(path)
        if name in ("['layers']['attn']['w_o_LHKD']", "['layers']['mlp']['w_down_LFD']"):
            np.testing.assert_array_equal(x[0::2], flat[path][0::2])  # the source's layers
            np.testing.assert_allclose(x[1::2], 0.25 * flat[path][1::2], rtol=1e-7)
        else:
            np.testing.assert_array_equal(x, flat[path])


def test_the_blend_trains_in_one_compile_and_reaches_the_stored_tree():
    cfg = presets.get("tiny").override({
        "model.d_model": 32, "model.d_ff": 64, "model.n_layers": 2, "train.steps": 4,
        "train.batch_size": 2, "train.seq_len": 16, "optim.warmup_steps": 1,
        "growth.op": "random:2", "growth.source_steps": 3, "growth.grow_steps": 2})
    src = cfg.source_config()
    assert src.model.n_layers == 1 and src.train.steps == 3 and src.growth is None
    small = models.init(KEY, src.model)
    stored = growth.grow(small, src.model, cfg.model, "random", key=GROW_KEY)
    optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
    step = jax.jit(lambda s, b: core.train_step(s, b, cfg=cfg, optimizer=optimizer))
    state = core.init_state(cfg, optimizer, params=stored)
    batch = {"inputs": TOKENS_BT[:, :10] % 257, "targets": TOKENS_BT[:, 1:] % 257}
    factors = growth.blend_factors(src.model, cfg.model)
    # step 0: the model computes zero's blend (m = 0): the small model's function
    loss0 = float(core.loss_fn(growth.blend(state.params, factors, 0.0), batch, cfg.model)[0])
    np.testing.assert_allclose(loss0, float(core.loss_fn(small, batch, src.model)[0]),
                               **F32_REORDER)
    losses = []
    for _ in range(4):
        before = state.params
        m = min(int(state.step) / 2, 1.0)
        want = float(core.loss_fn(growth.blend(before, factors, m), batch, cfg.model)[0])
        state, metrics = step(state, batch)
        np.testing.assert_allclose(float(metrics["loss"]), want, **F32_REORDER)
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1  # m is traced from the step: one program
    # from step 2 on, m = 1: the effective parameters are the stored ones
    jax.tree.map(np.testing.assert_array_equal,
                 core.effective_params(state.params, state.step, cfg), state.params)
    assert float(core.eval_loss(state, batch, cfg)) == pytest.approx(
        float(core.loss_fn(state.params, batch, cfg.model)[1]["ce_loss"]), rel=1e-6)


def test_grow_steps_config_refusals():
    base = presets.get("tiny")
    with pytest.raises(Exception, match="growth.grow_steps: blends new parameters in for the "
                                        "'random' operator only"):
        base.override({"growth.op": "stack:2", "growth.source_steps": 3, "growth.grow_steps": 2})
    with pytest.raises(Exception, match="growth.grow_steps: must be <= train.steps"):
        base.override({"growth.op": "random:2", "growth.source_steps": 3,
                       "growth.grow_steps": 1000})
    with pytest.raises(Exception, match="growth.grow_optimizer_state"):
        base.override({"growth.op": "learn:2", "growth.source_steps": 3,
                       "growth.grow_optimizer_state": True})


def test_random_moments_follow_zero_maps():
    small_cfg, big_cfg = PAIRS["depth"]
    small = models.init(KEY, small_cfg)
    opt = optim.make_optimizer(OptimConfig(), 10)
    state = opt.init(small)
    state = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    grown = growth.grow_optimizer_state(state, small, small_cfg, big_cfg, "random", key=GROW_KEY)
    want = growth.grow_optimizer_state(state, small, small_cfg, big_cfg, "zero")
    jax.tree.map(np.testing.assert_array_equal, grown, want)
