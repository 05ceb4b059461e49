"""G_learn (LiGO, jscale.growth.ligo): the materialised tree at step 0 ≡ the operator it starts as
(stack / interpolate for depth, direct_width for width; transformer, MoE, Mamba), training the
expansion matrices lowers the big model's loss, the result has cfg_big's init tree, one compile
serves every step, and bad inputs are refused naming the field."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import MAMBA_MICRO, MOE_MICRO, PARSCALE_MICRO, TRANSFORMER_MICRO
from tolerances import F32_REORDER

from jscale import core, growth, models
from jscale.config import ConfigError
from jscale.growth import ligo

R = dataclasses.replace
KEY = jax.random.PRNGKey(0)
GROW_KEY = jax.random.PRNGKey(3)
VOCAB = 257  # the presets' byte tokenizer
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, VOCAB)
BATCH = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:]}  # B 2, T 16
STEPS, LR = 5, 1e-2
#: The loss must fall by at least this much in STEPS steps (measured: 0.06 for depth, > 2 for
#: width, whose D matrix learns fast).
MIN_DROP = 0.01

TRANSFORMER = R(TRANSFORMER_MICRO, vocab_size=VOCAB, n_layers=1)
MOE = R(MOE_MICRO, vocab_size=VOCAB, n_layers=1)
MAMBA = R(MAMBA_MICRO, vocab_size=VOCAB, n_layers=1)
WIDE = dict(d_model=64, n_heads=8, n_kv_heads=4)  # the head dim stays 8

#: (id, cfg_small, cfg_big, the operator learn starts as)
CASES = [
    ("transformer-depth-stack", TRANSFORMER, R(TRANSFORMER, n_layers=3), "stack"),
    ("transformer-depth-interpolate", TRANSFORMER, R(TRANSFORMER, n_layers=2), "interpolate"),
    ("transformer-width", TRANSFORMER, R(TRANSFORMER, **WIDE, d_ff=96), "direct_width"),
    ("transformer-width-bf16", R(TRANSFORMER, param_dtype="bfloat16", qk_norm=True, qkv_bias=True),
     R(TRANSFORMER, param_dtype="bfloat16", qk_norm=True, qkv_bias=True, n_heads=8, head_dim=8,
       d_ff=80),
     "direct_width"),
    ("moe-depth", MOE, R(MOE, n_layers=2), "stack"),
    ("moe-width", MOE, R(MOE, **WIDE, moe=R(MOE.moe, d_expert=24)), "direct_width"),
    ("mamba-depth", MAMBA, R(MAMBA, n_layers=2), "stack"),
    ("mamba-width", MAMBA, R(MAMBA, d_model=32), "direct_width"),
]
BY_ID = {c[0]: c[1:] for c in CASES}


def _f32(tree):
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]


def _same_tree_as_init(params, cfg):
    want = jax.eval_shape(lambda k: models.init(k, cfg), KEY)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for x, w in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        assert (x.shape, x.dtype) == (w.shape, w.dtype)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_step_zero_is_the_init_operator(case):
    _, cfg_small, cfg_big, op = case
    small = models.init(KEY, cfg_small)
    want = growth.grow(small, cfg_small, cfg_big, op, key=GROW_KEY)
    init = None if op == "direct_width" else op
    got = ligo.learn(small, cfg_small, cfg_big, GROW_KEY, batches=[], steps=0, init=init)
    _same_tree_as_init(got, cfg_big)
    for x, y in zip(_f32(got), _f32(want), strict=True):
        np.testing.assert_allclose(x, y, **F32_REORDER)


@pytest.fixture(scope="module", params=["transformer-depth-stack", "mamba-width", "moe-width"])
def trained(request):
    """``(cfg_small, cfg_big, small, learned, loss at step 0, loss after, compiles)`` of one
    ``learn`` run of STEPS steps on BATCH repeated."""
    cfg_small, cfg_big, op = BY_ID[request.param]
    small = models.init(KEY, cfg_small)
    state = models.init_model_state(cfg_big)
    before = float(core.loss_fn(growth.grow(small, cfg_small, cfg_big, op, key=GROW_KEY), BATCH,
                                cfg_big, state)[0])
    n0 = ligo.train_step._cache_size()
    learned = ligo.learn(small, cfg_small, cfg_big, GROW_KEY, batches=iter([BATCH] * STEPS),
                         steps=STEPS, lr=LR)
    compiles = ligo.train_step._cache_size() - n0
    after = float(core.loss_fn(learned, BATCH, cfg_big, state)[0])
    return cfg_small, cfg_big, small, learned, before, after, compiles


def test_training_lowers_the_big_models_loss(trained):
    *_, before, after, _ = trained
    assert np.isfinite(after)
    assert after < before - MIN_DROP, (before, after)


def test_learned_tree_is_cfg_bigs_init_tree(trained):
    cfg_small, cfg_big, small, learned, *_ = trained
    _same_tree_as_init(learned, cfg_big)
    stacks = {st.key for st in models.family_of(cfg_big).spec(cfg_big).layer_stacks}
    if cfg_big.n_layers != cfg_small.n_layers:  # depth: what is not stacked is copied, not learned
        for top in set(small) - stacks:
            for x, y in zip(_f32(small[top]), _f32(learned[top]), strict=True):
                np.testing.assert_array_equal(x, y)


def test_one_compile_serves_every_step(trained):
    cfg_small, cfg_big, small, *_, compiles = trained
    assert compiles == 1
    n0 = ligo.train_step._cache_size()
    ligo.learn(small, cfg_small, cfg_big, GROW_KEY, batches=[BATCH] * 2, steps=2, lr=LR)
    assert ligo.train_step._cache_size() == n0  # a second call reuses it too


def test_running_out_of_batches_is_refused():
    cfg_small, cfg_big, _ = BY_ID["transformer-depth-stack"]
    small = models.init(KEY, cfg_small)
    with pytest.raises(ValueError, match=r"ran out after 1 batches; steps=3"):
        ligo.learn(small, cfg_small, cfg_big, batches=[BATCH], steps=3, lr=LR)


@pytest.mark.parametrize("cfg_small,cfg_big,init,field", [
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, n_layers=3), None, "model.n_layers"),  # × 1.5
    (TRANSFORMER, R(TRANSFORMER, n_layers=2, d_model=64, n_heads=8), None, "model.d_model"),
    (TRANSFORMER, R(TRANSFORMER, d_model=48, n_heads=6), None, "model.d_model"),  # × 1.5
    (TRANSFORMER, R(TRANSFORMER, n_layers=2), "direct_width", "init"),
    (TRANSFORMER, R(TRANSFORMER, d_ff=96), "stack", "init"),
    (PARSCALE_MICRO, R(PARSCALE_MICRO, n_layers=4), None, "model"),
    (TRANSFORMER, R(MAMBA, n_layers=2), None, "model"),
], ids=["depth-x1.5", "depth-and-width", "d_model-x1.5", "depth-init", "width-init", "parscale",
        "two-families"])
def test_configs_no_call_maps_are_refused(cfg_small, cfg_big, init, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        ligo.init_expansion(cfg_small, cfg_big, GROW_KEY, init)


def test_bad_arguments_are_refused():
    cfg_small, cfg_big, _ = BY_ID["transformer-depth-stack"]
    small = models.init(KEY, cfg_small)
    with pytest.raises(ConfigError, match="^steps:"):
        ligo.learn(small, cfg_small, cfg_big, batches=[], steps=-1)
    with pytest.raises(ValueError, match="params_small"):
        ligo.learn(jax.tree.map(lambda x: jnp.zeros((1,)), small), cfg_small, cfg_big,
                   batches=[], steps=0)
