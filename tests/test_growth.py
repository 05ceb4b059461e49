"""Growth operators (jscale.growth): layer order of the depth operators, function preservation where
claimed (logits of the grown model ≡ the small model's), grown trees ≡ cfg_big's init and counts,
grown Adam moments, the paper's timing guideline, the RMSNorm claims, and refusals naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import MAMBA_MICRO, MOE_MICRO, PARSCALE_MICRO, TRANSFORMER_MICRO
from tolerances import F32_REORDER

from jscale import growth, models, nn, optim
from jscale.config import ConfigError, OptimConfig

R = dataclasses.replace
KEY = jax.random.PRNGKey(0)
GROW_KEY = jax.random.PRNGKey(3)
TOKENS_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, TRANSFORMER_MICRO.vocab_size)

#: The transformer with every optional leaf: qk-norm scales, qkv biases, an untied head.
FULL = R(TRANSFORMER_MICRO, qk_norm=True, qkv_bias=True, tie_embeddings=False)
#: An MoE transformer of three stacks: 1 dense layer, 1 period (2 dense + 1 MoE), a 1-layer tail.
MOE_STACKS = R(MOE_MICRO, n_layers=5, moe=R(MOE_MICRO.moe, first_dense_layers=1, every=3))
#: Mamba with the in/out projection biases (``b_out_D`` writes the residual stream too).
MAMBA_BIAS = R(MAMBA_MICRO, bias=True)


def deeper(cfg, g: int):
    """``cfg`` with ``g`` times the layers (and, for MoE, the leading dense layers)."""
    if getattr(cfg, "moe", None) is not None:
        return R(cfg, n_layers=g * cfg.n_layers,
                 moe=R(cfg.moe, first_dense_layers=g * cfg.moe.first_dense_layers))
    return R(cfg, n_layers=g * cfg.n_layers)


@functools.cache
def init(cfg):
    return models.init(KEY, cfg)


def logits(params, cfg) -> np.ndarray:
    return np.asarray(models.forward(params, TOKENS_BT, cfg)[0])


@functools.cache
def small_logits(cfg) -> np.ndarray:
    """The logits of ``init(cfg)`` (shared by the tests that grow the same small model)."""
    return logits(init(cfg), cfg)


def stacked(params, cfg):
    """``{(stack key, *path): leaf}`` of every leaf stacked on ``L``."""
    keys = {st.key for st in models.family_of(cfg).spec(cfg).layer_stacks}
    return {p: x for p, x in _flat(params).items() if p[0] in keys}


def _flat(tree):
    return {tuple(str(k.key) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------------------------------
# 1. layer order


@pytest.mark.parametrize("cfg,g", [(TRANSFORMER_MICRO, 3), (MOE_STACKS, 2), (MAMBA_MICRO, 2)],
                         ids=["transformer", "moe-stacks", "mamba"])
def test_stack_and_interpolate_layer_order(cfg, g):
    small = init(cfg)
    steps = {st.key: st.n_steps for st in models.family_of(cfg).spec(cfg).layer_stacks}
    for op, order in (("stack", lambda i, L: i % L), ("interpolate", lambda i, L: i // g)):
        big = growth.grow(small, cfg, deeper(cfg, g), op)
        flat_small, flat_big = _flat(small), _flat(big)
        assert flat_small.keys() == flat_big.keys()
        for path, x in flat_small.items():
            y = np.asarray(flat_big[path])
            if path[0] not in steps:  # embedding, final norm, head: copied
                np.testing.assert_array_equal(y, x)
                continue
            L = steps[path[0]]
            assert y.shape == (g * L, *x.shape[1:]), (op, path)
            for i in range(g * L):
                np.testing.assert_array_equal(y[i], x[order(i, L)], err_msg=f"{op} {path} {i}")


@pytest.mark.parametrize("placement", growth.PLACEMENTS)
def test_zero_depth_new_layers_are_copies_with_zero_outputs(placement):
    cfg, g = MOE_STACKS, 2
    small = init(cfg)
    big = growth.grow(small, cfg, deeper(cfg, g), "zero", placement=placement)
    outputs = {"w_o_LHKD", "w_down_LFD", "w_down_LEFD"}
    for path, x in stacked(small, cfg).items():
        y = np.asarray(_flat(big)[path])
        L = x.shape[0]
        for i in range(g * L):
            src, new = (i // g, i % g != 0) if placement == "interleave" else (i % L, i >= L)
            if new and path[-1] in outputs:
                assert not np.any(y[i]), (path, i)
            else:
                np.testing.assert_array_equal(y[i], x[src], err_msg=f"{path} {i}")


# ---------------------------------------------------------------------------------------------------
# 2. function preservation


WIDE = dict(d_model=64, n_heads=8, n_kv_heads=4)  # the head dim stays 8
#: (id, cfg_small, cfg_big, op, options, the small model's config to compare with): every claim of
#: preservation in jscale.growth; zero d_model growth is compared with the small model run with the
#: RMSNorm epsilon × D_big/D_small (the claim; configs without qk-norm, whose epsilon stays).
PRESERVING = [
    ("zero-depth-interleave", FULL, deeper(FULL, 2), "zero", {}, None),
    ("zero-depth-end", FULL, deeper(FULL, 3), "zero", {"placement": "end"}, None),
    ("zero-depth-moe", MOE_STACKS, deeper(MOE_STACKS, 2), "zero", {}, None),
    ("zero-depth-mamba", MAMBA_BIAS, deeper(MAMBA_BIAS, 2), "zero", {}, None),
    ("zero-ffn-heads", FULL, R(FULL, d_ff=80, n_heads=6, n_kv_heads=3, head_dim=8), "zero", {},
     None),
    ("zero-moe-experts", MOE_MICRO, R(MOE_MICRO, moe=R(MOE_MICRO.moe, d_expert=24)), "zero", {},
     None),
    ("zero-mamba-expand", MAMBA_MICRO, R(MAMBA_MICRO, expand=3), "zero", {}, None),
    ("zero-d_model", TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, **WIDE, d_ff=128), "zero", {},
     R(TRANSFORMER_MICRO, norm_eps=2 * TRANSFORMER_MICRO.norm_eps)),
    ("zero-d_model-moe", MOE_MICRO, R(MOE_MICRO, **WIDE, moe=R(MOE_MICRO.moe, d_expert=24)), "zero",
     {}, R(MOE_MICRO, norm_eps=2 * MOE_MICRO.norm_eps)),
    ("zero-d_model-mamba", MAMBA_BIAS, R(MAMBA_BIAS, d_model=24), "zero", {},
     R(MAMBA_BIAS, norm_eps=MAMBA_BIAS.norm_eps * 24 / 16)),
    ("direct-ffn-heads", FULL, R(FULL, d_ff=80, n_heads=6, n_kv_heads=3, head_dim=8),
     "direct_width", {}, None),
    ("direct-heads-per-group", FULL, R(FULL, n_heads=8, head_dim=8), "direct_width", {}, None),
    ("direct-d_model", FULL, R(FULL, **WIDE, d_ff=96), "direct_width", {}, None),
    ("direct-d_model-moe", MOE_MICRO, R(MOE_MICRO, **WIDE, moe=R(MOE_MICRO.moe, d_expert=24)),
     "direct_width", {}, None),
    ("direct-d_model-mamba", MAMBA_BIAS, R(MAMBA_BIAS, d_model=32), "direct_width", {}, None),
]


@pytest.mark.parametrize("name,small_cfg,big_cfg,op,options,ref_cfg", PRESERVING,
                         ids=[c[0] for c in PRESERVING])
def test_growth_preserves_the_function(name, small_cfg, big_cfg, op, options, ref_cfg):
    small = init(small_cfg)
    big = growth.grow(small, small_cfg, big_cfg, op, key=GROW_KEY, **options)
    want = small_logits(small_cfg) if ref_cfg is None else logits(small, ref_cfg)
    np.testing.assert_allclose(logits(big, big_cfg), want, **F32_REORDER)


def test_zero_d_model_growth_is_not_exact_at_the_same_epsilon():
    """The claim is eps → eps·D_big/D_small, not exactness: with a visible epsilon the grown model
    matches the scaled-epsilon small model and not the small model itself."""
    cfg = R(TRANSFORMER_MICRO, norm_eps=1e-2)
    big_cfg = R(cfg, **WIDE, d_ff=128)
    small = init(cfg)
    got = logits(growth.grow(small, cfg, big_cfg, "zero"), big_cfg)
    np.testing.assert_allclose(got, logits(small, R(cfg, norm_eps=2e-2)), **F32_REORDER)
    assert not np.allclose(got, logits(small, cfg), **F32_REORDER)


def test_stack_is_not_function_preserving():
    small = init(TRANSFORMER_MICRO)
    big_cfg = deeper(TRANSFORMER_MICRO, 2)
    big = growth.grow(small, TRANSFORMER_MICRO, big_cfg, "stack")
    assert not np.allclose(logits(big, big_cfg), small_logits(TRANSFORMER_MICRO), **F32_REORDER)
    assert growth.OPERATORS["stack"].preserves_function is False


def test_rms_norm_claims():
    """The exact RMSNorm facts the width operators rest on (``r = D_small / D_big``)."""
    D_s, g, eps = 8, 3, 0.1  # a large epsilon, so that its role is visible
    x_BD = jax.random.normal(jax.random.PRNGKey(5), (4, D_s))
    scale_D = jax.random.uniform(jax.random.PRNGKey(6), (D_s,), minval=0.5, maxval=1.5)
    D_b = g * D_s
    r = D_s / D_b
    ref = nn.rms_norm(x_BD, scale_D, eps / r)
    # zero growth: new features 0, scale × sqrt(r) ⇒ old features = the small norm with eps / r,
    # new ones 0; without the rescale the old features come out sqrt(1/r) too large.
    pad_BD = jnp.pad(x_BD, ((0, 0), (0, D_b - D_s)))
    pad_scale_D = jnp.pad(scale_D, (0, D_b - D_s), constant_values=1.0)
    out = nn.rms_norm(pad_BD, pad_scale_D * math.sqrt(r), eps)
    np.testing.assert_allclose(out[:, :D_s], ref, **F32_REORDER)
    np.testing.assert_array_equal(out[:, D_s:], 0.0)
    np.testing.assert_allclose(nn.rms_norm(pad_BD, pad_scale_D, eps)[:, :D_s],
                               ref / math.sqrt(r), **F32_REORDER)
    assert not np.allclose(out[:, :D_s], nn.rms_norm(x_BD, scale_D, eps), **F32_REORDER)
    # direct growth: every feature copied g times ⇒ the same mean square, the norm's output copied
    # (epsilon included); the scale ÷ g divides the readers of the normed features by g.
    tile = jnp.arange(D_b) % D_s
    np.testing.assert_allclose(nn.rms_norm(x_BD[:, tile], scale_D[tile], eps),
                               nn.rms_norm(x_BD, scale_D, eps)[:, tile], **F32_REORDER)
    # random duplicates (feature 0 three times, the rest once) change the mean square
    dup = jnp.concatenate([jnp.arange(D_s), jnp.zeros(2, jnp.int32)])
    assert not np.allclose(nn.rms_norm(x_BD[:, dup], scale_D[dup], eps),
                           nn.rms_norm(x_BD, scale_D, eps)[:, dup], **F32_REORDER)


def test_direct_width_new_units_copy_old_ones():
    """New FFN units' input weights are copies of old units'; the old units keep their positions;
    the down projection of a unit with c copies is divided by c."""
    cfg, big_cfg = TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, d_ff=100)
    small = init(cfg)
    big = growth.grow(small, cfg, big_cfg, "direct_width", key=GROW_KEY)
    gate_s, gate_b = small["layers"]["mlp"]["w_gate_LDF"], big["layers"]["mlp"]["w_gate_LDF"]
    np.testing.assert_array_equal(gate_b[..., :64], gate_s)
    src = [int(np.flatnonzero(np.all(gate_s == gate_b[..., [f]], axis=(0, 1)))[0])
           for f in range(100)]
    copies = np.bincount(src, minlength=64)
    down_s, down_b = small["layers"]["mlp"]["w_down_LFD"], big["layers"]["mlp"]["w_down_LFD"]
    np.testing.assert_allclose(down_b, down_s[:, src] / copies[src][None, :, None],
                               **F32_REORDER)
    other = growth.grow(small, cfg, big_cfg, "direct_width", key=jax.random.PRNGKey(4))
    assert not np.array_equal(other["layers"]["mlp"]["w_gate_LDF"], gate_b)  # the key chooses


# ---------------------------------------------------------------------------------------------------
# 3. grown trees ≡ cfg_big's init


GROWTHS = PRESERVING + [
    ("stack-moe", MOE_MICRO, deeper(MOE_MICRO, 2), "stack", {}, None),
    ("interpolate-mamba", MAMBA_MICRO, deeper(MAMBA_MICRO, 3), "interpolate", {}, None),
    ("stack-bf16", R(FULL, param_dtype="bfloat16"), deeper(R(FULL, param_dtype="bfloat16"), 2),
     "stack", {}, None),
    ("direct-bf16", R(FULL, param_dtype="bfloat16"), R(FULL, param_dtype="bfloat16", **WIDE),
     "direct_width", {}, None),
]


@pytest.mark.parametrize("name,small_cfg,big_cfg,op,options,ref_cfg", GROWTHS,
                         ids=[c[0] for c in GROWTHS])
def test_grown_tree_is_cfg_big_init_shaped(name, small_cfg, big_cfg, op, options, ref_cfg):
    big = growth.grow(init(small_cfg), small_cfg, big_cfg, op, key=GROW_KEY, **options)
    want = jax.eval_shape(lambda: models.init(KEY, big_cfg))
    assert jax.tree.structure(big) == jax.tree.structure(want)
    for x, w in zip(jax.tree.leaves(big), jax.tree.leaves(want), strict=True):
        assert (x.shape, x.dtype) == (w.shape, w.dtype)
    assert sum(x.size for x in jax.tree.leaves(big)) == models.count_params(big_cfg)["total"]


# ---------------------------------------------------------------------------------------------------
# 4. Adam moments


def _trained_state(params, cfg):
    """An AdamW state after one update with non-zero gradients (so mu and nu are not zero)."""
    opt = optim.make_optimizer(OptimConfig(), 10)

    def step(params):
        grads = jax.tree.map(lambda x: jnp.ones_like(x) + x, params)
        return opt.update(grads, opt.init(params), params)[1]
    return jax.jit(step)(params)  # (one program: eager optax dispatches a few hundred ops)


def _moments(state):
    adam = state.inner_state[1][0]
    return {"mu": adam.mu, "nu": adam.nu}


@pytest.mark.parametrize("op,big_cfg,options", [
    ("stack", deeper(MOE_STACKS, 2), {}),
    ("zero", deeper(MOE_STACKS, 2), {}),
    ("zero", R(MOE_MICRO, **WIDE, moe=R(MOE_MICRO.moe, d_expert=24)), {}),
    ("direct_width", R(MOE_MICRO, **WIDE, moe=R(MOE_MICRO.moe, d_expert=24)), {}),
], ids=["stack", "zero-depth", "zero-width", "direct-width"])
def test_grown_adam_moments(op, big_cfg, options):
    small_cfg = MOE_STACKS if big_cfg.n_layers != MOE_MICRO.n_layers else MOE_MICRO
    small = init(small_cfg)
    state = _trained_state(small, small_cfg)
    big_params = growth.grow(small, small_cfg, big_cfg, op, key=GROW_KEY, **options)
    big_state = growth.grow_optimizer_state(state, small, small_cfg, big_cfg, op, key=GROW_KEY,
                                            **options)
    assert big_state.count == state.count
    assert big_state.hyperparams == state.hyperparams
    for which, moment in _moments(big_state).items():
        assert jax.tree.structure(moment) == jax.tree.structure(big_params)
        for m, p in zip(jax.tree.leaves(moment), jax.tree.leaves(big_params), strict=True):
            assert m.shape == p.shape
        old = _moments(state)[which]
        if op == "stack":  # copies, like the parameters
            grown = growth.grow(old, small_cfg, big_cfg, "stack")
            jax.tree.map(np.testing.assert_array_equal, moment, grown)
        elif big_cfg.n_layers != small_cfg.n_layers:  # zero depth: new layers all zero
            for path, x in stacked(old, small_cfg).items():
                y = np.asarray(_flat(moment)[path])
                np.testing.assert_array_equal(y[0::2], x)
                np.testing.assert_array_equal(y[1::2], 0.0)
        else:  # width: old entries at the leading positions (n_heads / n_kv_heads
            # stays, so the heads too), new entries zero
            flat = _flat(moment)
            for path, x in _flat(old).items():
                y = np.asarray(flat[path])
                lead = y[tuple(slice(0, n) for n in x.shape)]
                np.testing.assert_array_equal(lead, x, err_msg=str(path))
            # every old entry is somewhere, once; the rest is zero
            old_leaves = [np.asarray(x) for x in jax.tree.leaves(old)]
            big_leaves = [np.asarray(x) for x in jax.tree.leaves(moment)]
            np.testing.assert_allclose(sum(x.sum() for x in big_leaves),
                                       sum(x.sum() for x in old_leaves), rtol=F32_REORDER["rtol"])
            assert (sum(np.count_nonzero(x) for x in big_leaves)
                    == sum(np.count_nonzero(x) for x in old_leaves))


# ---------------------------------------------------------------------------------------------------
# 5. the timing guideline


def test_growth_tokens_reference_values():
    assert round(growth.growth_tokens(7e9, 2e12) / 1e9, 2) == 11.11  # Llama2-7B
    assert round(growth.growth_tokens(8e9, 15e12) / 1e9, 2) == 6.58  # Llama3-8B


# ---------------------------------------------------------------------------------------------------
# 6. refusals


REFUSED = [
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, n_layers=5), "stack", "model.n_layers"),
    (TRANSFORMER_MICRO, TRANSFORMER_MICRO, "interpolate", "model.n_layers"),
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, n_layers=4, d_model=64, n_heads=8), "stack",
     "model.d_model"),
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, n_layers=4, vocab_size=64), "zero",
     "model.vocab_size"),
    (MOE_STACKS, R(MOE_STACKS, n_layers=10), "stack", "model.moe.first_dense_layers"),
    (R(MOE_MICRO, n_layers=4, moe=R(MOE_MICRO.moe, first_dense_layers=1, every=2)),
     R(MOE_MICRO, n_layers=8, moe=R(MOE_MICRO.moe, first_dense_layers=2, every=2)), "stack",
     "model.n_layers"),  # the dense tail (1 layer) doubled is a whole period
    (MOE_MICRO, R(MOE_MICRO, n_layers=4, moe=R(MOE_MICRO.moe, n_experts=8)), "stack",
     "model.moe.n_experts"),
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, n_layers=4, d_ff=128), "zero", "model.d_ff"),
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, n_layers=4), "direct_width", "model.n_layers"),
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, d_model=48, n_heads=6, n_kv_heads=3),
     "direct_width", "model.d_model"),
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, d_ff=32), "zero", "model.d_ff"),
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, d_model=64), "zero", "model.head_dim"),
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, n_kv_heads=4), "zero", "model.n_heads"),
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, n_heads=2, n_kv_heads=1, head_dim=8), "zero",
     "model.n_kv_heads"),
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, remat="full"), "zero", "model:"),
    (TRANSFORMER_MICRO, R(TRANSFORMER_MICRO, rope_theta=500.0, d_ff=128), "zero",
     "model.rope_theta"),
    (MAMBA_MICRO, R(MAMBA_MICRO, d_state=8), "zero", "model.d_state"),
    (MAMBA_MICRO, R(TRANSFORMER_MICRO, n_layers=4), "stack", "model:"),
    (PARSCALE_MICRO, R(PARSCALE_MICRO, n_layers=4), "stack", "model:"),
]


@pytest.mark.parametrize("small_cfg,big_cfg,op,field", REFUSED,
                         ids=[f"{i}-{c[2]}-{c[3]}" for i, c in enumerate(REFUSED)])
def test_refusals_name_the_field(small_cfg, big_cfg, op, field):
    params = jax.eval_shape(lambda: models.init(KEY, small_cfg))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    with pytest.raises(ConfigError, match="^" + re.escape(field if field.endswith(":")
                                                          else field + ":")):
        growth.grow(params, small_cfg, big_cfg, op, key=GROW_KEY)


def test_refusals_of_arguments():
    cfg = TRANSFORMER_MICRO
    small = init(cfg)
    with pytest.raises(ConfigError, match="^op:"):
        growth.grow(small, cfg, deeper(cfg, 2), "splice")
    with pytest.raises(ValueError, match="key="):
        growth.grow(small, cfg, deeper(cfg, 2), "random")
    with pytest.raises(ConfigError, match="^op: has no fixed index maps"):
        growth.grow_optimizer_state(optim.make_optimizer(OptimConfig(), 4).init(small), small, cfg,
                                    deeper(cfg, 2), "learn")
    with pytest.raises(ConfigError, match="^placement:"):
        growth.grow(small, cfg, deeper(cfg, 2), "zero", placement="middle")
    with pytest.raises(ValueError, match="needs a key"):
        growth.grow(small, cfg, R(cfg, d_ff=80), "direct_width")
    with pytest.raises(ValueError, match=r"params_small: \['embed'\]\['table_VD'\]"):
        growth.grow(small, R(cfg, d_model=64, n_heads=8), deeper(R(cfg, d_model=64, n_heads=8), 2),
                    "stack")
    with pytest.raises(ValueError, match="no subtree"):
        growth.grow_optimizer_state({"count": jnp.zeros(())}, small, cfg, deeper(cfg, 2), "stack")


def test_operators_table():
    """Every operator of the paper is listed and built; all but G_learn (whose maps are learned)
    have fixed index maps for the optimizer moments."""
    assert set(growth.OPERATORS) == {"stack", "interpolate", "zero", "direct_width", "random",
                                     "learn"}
    for name, op in growth.OPERATORS.items():
        assert op.name == name and op.supported and op.fn is not None
        assert (op.plan is None) == (name == "learn")
        assert op.grows in ("depth", "width", "depth or width") and op.families and op.note
