"""Dense transformer invariants: causality, scan ≡ loop, remat ≡ none, GQA ≡ MHA, counts ≡ tree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import F32_GRAD, F32_REORDER, FLOPS_VS_XLA_RTOL
from xla_cost import forward_flops

import jscale
from jscale.models import transformer
from jscale.models.transformer import TransformerConfig

CFG = TransformerConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                        max_seq_len=64)
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
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        letters = str(path[-1].key).rsplit("_", 1)[-1]
        assert len(letters) == leaf.ndim, (path, leaf.shape)


def test_causality_via_gradients(params):
    x_BTD = jax.random.normal(jax.random.PRNGKey(2), (1, T, CFG.d_model))
    t = 5

    def out_at_t(x):
        return transformer.apply_embedded(params, x, CFG)[0][0, t].sum()

    g_TD = np.asarray(jax.jit(jax.grad(out_at_t))(x_BTD)[0])
    assert np.all(g_TD[t + 1:] == 0.0), "future positions influence the past"
    assert np.all(np.abs(g_TD[: t + 1]).sum(-1) > 0), "a past position has no influence"


def test_segment_ids_isolate_documents(params, tokens_BT):
    seg_BT = jnp.array([[1] * 5 + [2] * 7] * B)
    base = _logits(params, tokens_BT, CFG, segment_ids_BT=seg_BT)
    changed = tokens_BT.at[:, :5].set((tokens_BT[:, :5] + 1) % CFG.vocab_size)
    other = _logits(params, changed, CFG, segment_ids_BT=seg_BT)
    np.testing.assert_array_equal(base[:, 5:], other[:, 5:])
    assert not np.allclose(base[:, :5], other[:, :5])
    # Without segment ids the second document does see the first.
    assert not np.allclose(_logits(params, tokens_BT, CFG)[:, 5:],
                           _logits(params, changed, CFG)[:, 5:])


def test_scan_equals_unrolled(params, tokens_BT):
    unrolled = dataclasses.replace(CFG, scan_layers=False)
    np.testing.assert_allclose(_logits(params, tokens_BT, CFG), _logits(params, tokens_BT, unrolled),
                               **F32_REORDER)


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


VARIANTS = [CFG, dataclasses.replace(CFG, qk_norm=True), dataclasses.replace(CFG, tie_embeddings=False),
            dataclasses.replace(CFG, head_dim=16), dataclasses.replace(CFG, n_kv_heads=1)]


@pytest.mark.parametrize("cfg", [p.model for p in map(jscale.presets.get, jscale.presets.names())]
                         + VARIANTS)
def test_count_params_equals_tree(cfg):
    tree = jax.eval_shape(lambda: jscale.init(jax.random.PRNGKey(0), cfg))
    counts = jscale.count_params(cfg)
    assert counts["total"] == sum(x.size for x in jax.tree.leaves(tree))
    embedding = tree["embed"]["table_VD"].size + (tree["head"]["w_DV"].size if "head" in tree else 0)
    assert counts["embedding"] == embedding
    assert counts["non_embedding"] == counts["total"] - embedding


@pytest.mark.parametrize("cfg", [dataclasses.replace(CFG, d_model=128, n_heads=4, d_ff=384,
                                                      vocab_size=257),
                                 dataclasses.replace(CFG, d_model=128, n_heads=8, n_kv_heads=8,
                                                     d_ff=256, vocab_size=257, qk_norm=True)])
def test_flops_per_token_matches_xla_cost_analysis(cfg):
    """Unrolled layers: XLA's cost analysis counts a while-loop body once, not per iteration."""
    cfg = dataclasses.replace(cfg, scan_layers=False)
    seq = 64
    analytic = jscale.flops_per_token(cfg, seq)
    np.testing.assert_allclose(forward_flops(cfg, B, seq), analytic["forward"] * B * seq,
                               rtol=FLOPS_VS_XLA_RTOL)
    assert analytic["training"] == 3 * analytic["forward"]
    causal = jscale.flops_per_token(cfg, seq, causal_attention=True)["forward"]
    assert causal == analytic["forward"] - cfg.n_layers * 2 * seq * cfg.n_heads * cfg.k


def test_bfloat16_compute(params, tokens_BT):
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    logits = _logits(params, tokens_BT, cfg)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, _logits(params, tokens_BT, CFG), atol=0.1)


@pytest.mark.parametrize("name", jscale.presets.names())
def test_every_preset_builds_and_runs(name):
    cfg = jscale.presets.get(name)
    params = jscale.init(jax.random.PRNGKey(0), cfg.model)
    logits, aux = jax.jit(lambda p, t: jscale.apply(p, t, cfg.model))(params,
                                                                      jnp.zeros((1, 8), jnp.int32))
    assert logits.shape == (1, 8, cfg.model.vocab_size) and aux == {}
    assert np.all(np.isfinite(logits))


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
