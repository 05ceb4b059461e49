"""The scaffold's general mechanisms, shown without editing shared layers: a test-only part with
non-gradient state, per-layer aux (a metric and a ``*_loss``) and per-layer inputs, composed with
SwiGLU into a test-only family; and attention's prefix-KV input."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import TRANSFORMER_MICRO, tree_allclose
from tolerances import F32_GRAD, F32_REORDER

import jscale
from jscale import models, nn, registry
from jscale.models import lm, transformer
from jscale.models.parts.attention import attention
from jscale.models.parts.base import Leaf, Normal, Part
from jscale.models.parts.swiglu import SwiGLU

B, T = 2, 7


@dataclasses.dataclass(frozen=True)
class Counter(Part):
    """Scales its input by ``w_D`` and adds a running bias (state) and a per-layer shift (layer
    input); counts its calls (state); reports a metric and a loss."""

    d_model: int

    def leaves(self):
        return [Leaf(("w_D",), (self.d_model,), Normal(1.0 / math.sqrt(self.d_model)))]

    def init_state(self):
        return {"count": jnp.zeros((), jnp.float32), "bias_D": jnp.zeros((self.d_model,), jnp.float32)}

    def apply(self, p, h_BTD, ctx, *, prepared=None, state=None, layer_input=None):
        shift_D = 0.0 if layer_input is None else layer_input["shift_D"]
        y_BTD = h_BTD * p["w_D"] + state["bias_D"] + shift_D
        aux = {"counter_mean": jnp.mean(h_BTD), "counter_loss": jnp.sum(p["w_D"] ** 2)}
        new = {"count": state["count"] + 1, "bias_D": state["bias_D"] + jnp.mean(h_BTD, axis=(0, 1))}
        return y_BTD, aux, new

    def count(self):
        return self.d_model

    def flops(self, seq_len):
        return 2 * self.d_model


@dataclasses.dataclass(frozen=True, kw_only=True)
class DummyConfig:
    vocab_size: int = 37
    d_model: int = 16
    n_layers: int = 3
    d_ff: int = 32
    scan_layers: bool = True
    remat: str = "none"
    init_scale: float = 1.0


class DummyFamily(lm.LMFamily):
    name = "dummy-counter"
    config_cls = DummyConfig

    def spec(self, cfg):
        return lm.LMSpec(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                         norm_eps=1e-6, tie_embeddings=True, init_scale=cfg.init_scale,
                         dtype="float32", param_dtype="float32", remat=cfg.remat,
                         scan_layers=cfg.scan_layers,
                         block=(lm.Sublayer("mlp", "mlp_norm", SwiGLU(d_model=cfg.d_model, d_ff=cfg.d_ff)),
                                lm.Sublayer("counter", "counter_norm", Counter(d_model=cfg.d_model))))

    def describe(self, cfg):
        return f"d_model={cfg.d_model} n_layers={cfg.n_layers}"

    def max_seq_len(self, cfg):
        return None


CFG = DummyConfig()


@pytest.fixture(scope="module", autouse=True)
def dummy_family():
    registry.register(DummyFamily())
    yield
    registry.unregister("dummy-counter")


@pytest.fixture(scope="module")
def params():
    return models.init(jax.random.PRNGKey(0), CFG)


@pytest.fixture(scope="module")
def tokens_BT():
    return jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, CFG.vocab_size)


def _forward(cfg=CFG):
    return jax.jit(lambda p, t, s, i: models.forward(p, t, cfg, model_state=s, layer_inputs=i))


def test_state_is_declared_stacked_and_counted(params):
    state = models.init_model_state(CFG)
    assert jax.tree.map(jnp.shape, state) == {"layers": {"counter": {"count_L": (3,),
                                                                     "bias_LD": (3, 16)}}}
    assert params["layers"]["counter"]["w_LD"].shape == (3, 16)
    assert models.count_params(CFG)["total"] == sum(x.size for x in jax.tree.leaves(params))


def test_state_updates_each_call_and_changes_the_output(params, tokens_BT):
    fwd = _forward()
    state0 = models.init_model_state(CFG)
    logits1, aux, state1 = fwd(params, tokens_BT, state0, None)
    np.testing.assert_array_equal(state1["layers"]["counter"]["count_L"], 1.0)
    _, _, state2 = fwd(params, tokens_BT, state1, None)
    np.testing.assert_array_equal(state2["layers"]["counter"]["count_L"], 2.0)
    bias_LD = np.asarray(state1["layers"]["counter"]["bias_LD"])
    assert np.all(bias_LD != 0) and not np.allclose(bias_LD[0], bias_LD[1])  # one slice per layer
    logits_again, _, _ = fwd(params, tokens_BT, state1, None)
    assert not np.allclose(logits_again, logits1)  # the state is read
    # `apply` (no state given) starts from init_model_state.
    np.testing.assert_allclose(jax.jit(lambda p, t: models.apply(p, t, CFG)[0])(params, tokens_BT),
                               logits1, **F32_REORDER)


def test_aux_is_the_mean_over_layers_and_state_has_no_gradient(params, tokens_BT):
    _, aux, _ = _forward()(params, tokens_BT, models.init_model_state(CFG), None)
    assert set(aux) == {"counter_mean", "counter_loss"}
    w_LD = params["layers"]["counter"]["w_LD"]
    np.testing.assert_allclose(aux["counter_loss"], np.mean(np.sum(np.asarray(w_LD) ** 2, -1)),
                               **F32_REORDER)

    def state_sum(p):
        _, _, s = models.forward(p, tokens_BT, CFG)
        return jnp.sum(s["layers"]["counter"]["bias_LD"])

    grads = jax.jit(jax.grad(state_sum))(params)
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads))
    # ... while the aux loss has one.
    g = jax.jit(jax.grad(lambda p: models.forward(p, tokens_BT, CFG)[1]["counter_loss"]))(params)
    np.testing.assert_allclose(g["layers"]["counter"]["w_LD"], 2 * w_LD / CFG.n_layers, **F32_GRAD)


def test_layer_inputs_reach_their_layer(params, tokens_BT):
    fwd = _forward()
    state = models.init_model_state(CFG)
    zeros = {"counter": {"shift_LD": jnp.zeros((3, 16))}}
    base, _, _ = fwd(params, tokens_BT, state, None)
    np.testing.assert_allclose(fwd(params, tokens_BT, state, zeros)[0], base, **F32_REORDER)

    def loss(shift_LD):
        return fwd(params, tokens_BT, state, {"counter": {"shift_LD": shift_LD}})[0].sum()

    g_LD = np.asarray(jax.grad(loss)(jnp.zeros((3, 16))))
    assert np.all(np.abs(g_LD).sum(-1) > 0)  # every layer's slice is used
    shifted = zeros["counter"]["shift_LD"].at[2].set(1.0)
    assert not np.allclose(fwd(params, tokens_BT, state, {"counter": {"shift_LD": shifted}})[0], base)


@pytest.mark.parametrize("change", [{"scan_layers": False}, {"remat": "full"}])
def test_loop_and_remat_equal_the_scan_for_state_aux_and_inputs(params, tokens_BT, change):
    state = models.init_model_state(CFG)
    inputs = {"counter": {"shift_LD": jax.random.normal(jax.random.PRNGKey(2), (3, 16))}}
    ref = _forward()(params, tokens_BT, state, inputs)
    tree_allclose(_forward(dataclasses.replace(CFG, **change))(params, tokens_BT, state, inputs), ref,
                  **F32_REORDER)


def test_one_layer_slice_drops_its_L():
    assert nn.unstack_name("w_q_LDHK") == "w_q_DHK" and nn.stack_name("w_q_DHK") == "w_q_LDHK"
    assert nn.unstack_name("count_L") == "count" and nn.stack_name("count") == "count_L"
    assert nn.unstack_name("scale_D") == "scale_D"
    assert nn.unstack_names({"a": {"w_LDF": 1}, "b_LF": 2}) == {"a": {"w_DF": 1}, "b_F": 2}


# ---------------------------------------------------------------------------------------------------
# attention's prefix KV


def _naive_prefixed(q_BTHK, k_BSGK, v_BSGK, pk_BSGK, pv_BSGK, seg_BT):
    """Every query sees all prefix keys, then causally its own segment; GQA by repeating kv heads."""
    rep = q_BTHK.shape[2] // k_BSGK.shape[2]
    k = np.repeat(np.concatenate([pk_BSGK, k_BSGK], 1), rep, axis=2)
    v = np.repeat(np.concatenate([pv_BSGK, v_BSGK], 1), rep, axis=2)
    S, T = pk_BSGK.shape[1], q_BTHK.shape[1]
    scores = np.einsum("bthk,bshk->bhts", q_BTHK, k) / np.sqrt(q_BTHK.shape[-1])
    seen = np.tril(np.ones((T, T), bool))[None] & (seg_BT[:, :, None] == seg_BT[:, None, :])
    mask = np.concatenate([np.ones((q_BTHK.shape[0], T, S), bool), seen], -1)[:, None]
    scores = np.where(mask, scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bshk->bthk", w / w.sum(-1, keepdims=True), v)


def test_prefix_kv_is_seen_by_every_query_across_segments():
    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    q = jax.random.normal(ks[0], (B, T, 4, 8))
    k, v = (jax.random.normal(kk, (B, T, 2, 8)) for kk in ks[1:3])
    pk, pv = (jax.random.normal(kk, (B, 3, 2, 8)) for kk in ks[3:5])
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    out = jax.jit(lambda *a: attention(*a[:3], segment_ids_BT=a[5], impl="xla", prefix_k_BSGK=a[3],
                                       prefix_v_BSGK=a[4]))(q, k, v, pk, pv, seg)
    np.testing.assert_allclose(out, _naive_prefixed(*map(np.asarray, (q, k, v, pk, pv, seg))),
                               **F32_REORDER)


def test_prefix_kv_through_the_transformer_gets_no_rope_and_keeps_causality():
    cfg = TRANSFORMER_MICRO
    params = jscale.init(jax.random.PRNGKey(0), cfg)
    family = models.family_of(cfg)
    L, G, K, S = cfg.n_layers, cfg.n_kv_heads, cfg.k, 3
    pk, pv = jax.random.normal(jax.random.PRNGKey(4), (2, L, 1, S, G, K))
    x_BTD = jax.random.normal(jax.random.PRNGKey(5), (1, T, cfg.d_model))

    def out(x, pk, t):
        h, _, _ = family.hidden(params, x, cfg, layer_inputs={"attn": {"prefix_k_LBSGK": pk,
                                                                       "prefix_v_LBSGK": pv}})
        return family.head(params, h, cfg)[0, t].sum()

    g_TD = np.asarray(jax.jit(jax.grad(out), static_argnums=2)(x_BTD, pk, 2)[0])
    assert np.all(g_TD[3:] == 0.0) and np.all(np.abs(g_TD[:3]).sum(-1) > 0)
    g_prefix = np.asarray(jax.jit(jax.grad(out, argnums=1), static_argnums=2)(x_BTD, pk, 0))
    assert np.all(np.abs(g_prefix).sum((1, 2, 3, 4)) > 0)  # the first token sees every layer's prefix

    # Layer 0 by hand: the part's output with the prefix = naive attention over the raw prefix.
    attn = transformer.spec(cfg).block[0].part
    p0 = nn.unstack_names(jax.tree.map(lambda a: a[0], params["layers"]))
    h = nn.rms_norm(x_BTD, p0["attn_norm"]["scale_D"], cfg.norm_eps)
    ctx = lm.Context(segment_ids_BT=None, positions_BT=jnp.arange(T)[None])
    sin, cos = attn.prepare(ctx)
    y, _, _ = attn.apply(p0["attn"], h, ctx, prepared=(sin, cos),
                         layer_input={"prefix_k_BSGK": pk[0], "prefix_v_BSGK": pv[0]})
    a = p0["attn"]
    q = nn.apply_rope(jnp.einsum("btd,dhk->bthk", h, a["w_q_DHK"]), sin, cos)
    k = nn.apply_rope(jnp.einsum("btd,dgk->btgk", h, a["w_k_DGK"]), sin, cos)
    v = jnp.einsum("btd,dgk->btgk", h, a["w_v_DGK"])
    ref = _naive_prefixed(*map(np.asarray, (q, k, v, pk[0], pv[0], np.zeros((1, T), int))))
    np.testing.assert_allclose(y, np.einsum("bthk,hkd->btd", ref, a["w_o_HKD"]), **F32_REORDER)
