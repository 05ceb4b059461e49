"""Dense transformer specifics: parameter layout, remat ≡ none, attention ≡ naive MHA, GQA ≡ MHA, the
causal FLOP convention, bfloat16 compute, config errors. The invariants every family meets
(causality, document isolation, scan ≡ loop, counts ≡ tree, FLOPs ≡ XLA, presets build) are in
tests/test_families.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import TRANSFORMER_MICRO
from tolerances import BF16_VS_F32_LOGITS_ATOL, F32_GRAD, F32_REORDER

import jscale
from jscale.models import transformer

CFG = TRANSFORMER_MICRO
B, T = 2, 12


@pytest.fixture(scope="module")
def params():
    return jscale.init(jax.random.PRNGKey(0), CFG)


@pytest.fixture(scope="module")
def tokens_BT():
    return jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, CFG.vocab_size)


def _logits(params, tokens, cfg, **kw):
    return jax.jit(lambda p, t: jscale.apply(p, t, cfg, **kw)[0])(params, tokens)


def test_param_tree_layout(params):
    layers = params["layers"]
    assert layers["attn"]["w_q_LDHK"].shape == (2, 32, 4, 8)
    assert layers["attn"]["w_k_LDGK"].shape == (2, 32, 2, 8)
    assert layers["mlp"]["w_down_LFD"].shape == (2, 64, 32)
    assert "head" not in params  # tied by default


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "save_attention"])
def test_remat_equals_no_remat(params, tokens_BT, policy):
    def grads(cfg):
        def loss(p):
            logits, _ = jscale.apply(p, tokens_BT, cfg)
            return jax.nn.log_softmax(logits).mean()
        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = grads(CFG), grads(dataclasses.replace(CFG, remat=policy))
    np.testing.assert_allclose(l0, l1, **F32_REORDER)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_GRAD), g0, g1)


def _naive_mha(q_BTHK, k_BSHK, v_BSHK):
    """Textbook causal multi-head attention, written independently of the library."""
    scores = np.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK) / np.sqrt(q_BTHK.shape[-1])
    t, s = scores.shape[-2:]
    scores = np.where(np.tril(np.ones((t, s), bool)), scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhts,bshk->bthk", w, v_BSHK)


def test_attention_matches_naive_mha():
    q, k, v = jax.random.normal(jax.random.PRNGKey(3), (3, B, T, 4, 8))
    out = jax.jit(lambda *a: transformer.attention(*a, segment_ids_BT=None, impl="xla"))(q, k, v)
    np.testing.assert_allclose(out, _naive_mha(*map(np.asarray, (q, k, v))), **F32_REORDER)


def test_gqa_equals_mha_with_repeated_kv(params, tokens_BT):
    """A GQA model ≡ the MHA model whose K/V projections are repeated per query head."""
    mha_cfg = dataclasses.replace(CFG, n_kv_heads=CFG.n_heads)
    rep = CFG.n_heads // CFG.n_kv_heads
    mha = jax.tree.map(lambda x: x, params)
    for name in ("w_k_LDGK", "w_v_LDGK"):
        mha["layers"]["attn"][name] = jnp.repeat(params["layers"]["attn"][name], rep, axis=2)
    np.testing.assert_allclose(_logits(params, tokens_BT, CFG), _logits(mha, tokens_BT, mha_cfg),
                               **F32_REORDER)


@pytest.mark.parametrize("cfg", [dataclasses.replace(CFG, d_model=128, n_heads=4, d_ff=384,
                                                      vocab_size=257),
                                 dataclasses.replace(CFG, d_model=128, n_heads=8, n_kv_heads=8,
                                                     d_ff=256, vocab_size=257, qk_norm=True)])
def test_causal_flops_convention_counts_half_the_attention(cfg):
    """The full count is checked against XLA's cost analysis in tests/test_families.py."""
    seq = 64
    analytic = jscale.flops_per_token(cfg, seq)
    assert transformer.flops_per_token(cfg, seq) == analytic
    causal = transformer.flops_per_token(cfg, seq, causal_attention=True)["forward"]
    assert causal == analytic["forward"] - cfg.n_layers * 2 * seq * cfg.n_heads * cfg.k


def test_bfloat16_compute(params, tokens_BT):
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    logits = _logits(params, tokens_BT, cfg)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, _logits(params, tokens_BT, CFG),
                               atol=BF16_VS_F32_LOGITS_ATOL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_heads=6, n_kv_heads=4), r"model\.n_heads: must be divisible by model\.n_kv_heads=4"),
    (dict(d_model=30, n_heads=4), r"model\.d_model: must be divisible by model\.n_heads=4"),
    (dict(d_model=12, n_heads=4, n_kv_heads=4), r"model\.head_dim: must be even"),
    (dict(n_layers=0), r"model\.n_layers: must be > 0"),
    (dict(dtype="float64"), r"model\.dtype: must be one of"),
    (dict(remat="sometimes"), r"model\.remat: must be one of"),
    (dict(attention_impl="cuda"), r"model\.attention_impl: must be 'xla' or 'pallas'"),
])
def test_bad_model_config_raises(kwargs, match):
    with pytest.raises(jscale.ConfigError, match=match):
        dataclasses.replace(CFG, **kwargs)
