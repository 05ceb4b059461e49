"""The mixture-of-experts FFN (issue 13: the model and its invariants): one expert ≡ the dense
transformer, expert permutation symmetry, the part against a naive per-token reference (dropless and
capacity mode), the router's losses and metrics, the aux-loss-free bias, the layer pattern, counts,
bad input, the CLI/sweep keys; and, slow, training from the CLI, a vmapped sweep ≡ sequential and
bitwise resume after SIGKILL including the router bias. The shared invariants (causality, document
isolation, scan ≡ loop, counts ≡ tree, FLOPs vs XLA, init hash) run on the ``transformer-moe`` row of
tests/families.py."""

import dataclasses
import functools
import importlib
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import MOE_AUX, MOE_MICRO, TRANSFORMER_MICRO, tree_allclose
from helpers import env, finish, kill_mid_training, metrics_rows, micro_cfg, train_args
from tolerances import F32_GRAD, F32_REORDER, SWEEP_VMAP_VS_SEQUENTIAL

import jscale
from jscale import models, nn, sweep
from jscale.config import ConfigError, parse_overrides
from jscale.models import lm, transformer
from jscale.models.moe import MoEConfig
from jscale.models.parts import moe as moe_lib
from jscale.models.parts.moe import MoE
from jscale.models.parts.swiglu import SwiGLU
from jscale.models.transformer import moe_layer_indices

B, T = 2, 12


def _tokens(cfg, seed=1, shape=(B, T)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape), jnp.int32)


def _with_moe(cfg, **fields):
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **fields))


def _moe_part(cfg) -> MoE:
    return next(sub.part for st in transformer.spec(cfg).layer_stacks for sub in st.block
                if isinstance(sub.part, MoE))


# ---------------------------------------------------------------------------------------------------
# one expert ≡ the dense transformer; permutation symmetry


ONE_EXPERT = dataclasses.replace(TRANSFORMER_MICRO, moe=MoEConfig(
    n_experts=1, top_k=1, d_expert=None, n_shared_experts=0, load_balance_coeff=0.0,
    z_loss_coeff=0.0, bias_update_rate=0.0))


def _dense_to_one_expert(dense, router_LDE):
    """The dense model's parameters mapped onto the one-expert MoE tree."""
    layers = dense["layers"]
    mlp = layers["mlp"]
    return {"embed": dense["embed"], "final_norm": dense["final_norm"],
            "moe_layers": {"attn": layers["attn"], "attn_norm": layers["attn_norm"],
                           "moe_norm": layers["mlp_norm"],
                           "moe": {"w_router_LDE": router_LDE,
                                   "w_gate_LEDF": mlp["w_gate_LDF"][:, None],
                                   "w_up_LEDF": mlp["w_up_LDF"][:, None],
                                   "w_down_LEFD": mlp["w_down_LFD"][:, None]}}}


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
def test_one_expert_equals_the_dense_transformer(router):
    cfg = _with_moe(ONE_EXPERT, router=router)
    dense = jscale.init(jax.random.PRNGKey(0), TRANSFORMER_MICRO)
    L, D = cfg.n_layers, cfg.d_model
    router_LDE = jax.random.normal(jax.random.PRNGKey(1), (L, D, 1))
    params = _dense_to_one_expert(dense, router_LDE)
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(lambda: jscale.init(jax.random.PRNGKey(0), cfg)))
    tokens, targets = _tokens(cfg), _tokens(cfg, seed=2)

    def loss(p, c):
        logits = models.forward(p, tokens, c)[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    logits_dense = jax.jit(lambda p: jscale.apply(p, tokens, TRANSFORMER_MICRO)[0])(dense)
    logits_moe, aux = jax.jit(lambda p: jscale.apply(p, tokens, cfg))(params)
    np.testing.assert_allclose(logits_moe, logits_dense, **F32_REORDER)
    assert float(aux["load_balance_loss"]) == 0 and float(aux["router_z_loss"]) == 0
    assert float(aux["max_vio"]) == 0
    g_dense = jax.jit(jax.grad(lambda p: loss(p, TRANSFORMER_MICRO)))(dense)
    g_moe = jax.jit(jax.grad(lambda p: loss(p, cfg)))(params)
    np.testing.assert_allclose(g_moe["moe_layers"]["moe"]["w_router_LDE"], 0, atol=1e-7)
    tree_allclose(_dense_to_one_expert(g_dense, g_moe["moe_layers"]["moe"]["w_router_LDE"]),
                  g_moe, **F32_GRAD)


def _permute_experts(params, state, perm):
    moe = params["moe_layers"]["moe"]
    permuted = {**moe, **{k: moe[k][:, perm] for k in ("w_gate_LEDF", "w_up_LEDF", "w_down_LEFD")},
                "w_router_LDE": moe["w_router_LDE"][:, :, perm]}
    bias = state["moe_layers"]["moe"]["bias_LE"]
    return ({**params, "moe_layers": {**params["moe_layers"], "moe": permuted}},
            {"moe_layers": {"moe": {"bias_LE": bias[:, perm]}}})


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
def test_permuting_the_experts_leaves_the_output_unchanged(router):
    cfg = _with_moe(MOE_MICRO, router=router)
    params = jscale.init(jax.random.PRNGKey(0), cfg)
    bias = 0.05 * jax.random.normal(jax.random.PRNGKey(3), (cfg.n_layers, cfg.moe.n_experts))
    state = {"moe_layers": {"moe": {"bias_LE": bias}}}
    tokens = _tokens(cfg)
    fwd = jax.jit(lambda p, s: models.forward(p, tokens, cfg, model_state=s))
    logits, aux, new_state = fwd(params, state)
    perm = np.array([2, 0, 3, 1])
    p2, s2 = _permute_experts(params, state, perm)
    logits2, aux2, new_state2 = fwd(p2, s2)
    np.testing.assert_allclose(logits2, logits, **F32_REORDER)
    tree_allclose(aux2, aux, **F32_REORDER)
    np.testing.assert_allclose(new_state2["moe_layers"]["moe"]["bias_LE"],
                               new_state["moe_layers"]["moe"]["bias_LE"][:, perm], **F32_REORDER)
    # ... and a permutation of the weights alone (router columns kept) does change it.
    moe = params["moe_layers"]["moe"]
    p3 = {**params, "moe_layers": {**params["moe_layers"], "moe": {
        **moe, "w_gate_LEDF": moe["w_gate_LEDF"][:, perm]}}}
    assert not np.allclose(fwd(p3, state)[0], logits)


# ---------------------------------------------------------------------------------------------------
# the part against a naive per-token reference


def _swiglu_np(x, wg, wu, wd):
    g = x @ wg
    return (g / (1 + np.exp(-g)) * (x @ wu)) @ wd


def _naive_moe(part: MoE, p, h_TD, bias_E):
    """Token by token, choice-major priority (every first choice before any second choice)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    h = np.asarray(h_TD, np.float64)
    logits = h @ p["w_router_DE"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    scores = probs if part.router == "softmax_topk" else logits
    sel = np.argsort(-(scores + np.asarray(bias_E)), axis=-1, kind="stable")[:, :part.top_k]
    if part.router == "softmax_topk":
        gates = np.take_along_axis(probs, sel, -1)
    else:
        chosen = np.take_along_axis(logits, sel, -1)
        gates = np.exp(chosen - chosen.max(-1, keepdims=True))
        gates /= gates.sum(-1, keepdims=True)
    n_tokens = h.shape[0]
    cap = (math.inf if part.capacity_factor is None else
           moe_lib.capacity(n_tokens, part.top_k, part.n_experts, part.capacity_factor))
    filled, dropped = np.zeros(part.n_experts), 0
    y = np.zeros_like(h)
    for j in range(part.top_k):
        for t in range(n_tokens):
            e = sel[t, j]
            if filled[e] >= cap:
                dropped += 1
                continue
            filled[e] += 1
            y[t] += gates[t, j] * _swiglu_np(h[t], p["w_gate_EDF"][e], p["w_up_EDF"][e],
                                             p["w_down_EFD"][e])
    if part.n_shared_experts:
        s = p["shared"]
        y += _swiglu_np(h, s["w_gate_DF"], s["w_up_DF"], s["w_down_FD"])
    return y, sel, dropped / sel.size


def _one_layer(cfg, seed=0):
    params = jscale.init(jax.random.PRNGKey(seed), cfg)
    return nn.unstack_names(jax.tree.map(lambda a: a[0], params["moe_layers"]["moe"]))


def _apply_part(part, p, h_BTD, bias_E):
    ctx = lm.Context(segment_ids_BT=None, positions_BT=jnp.zeros(h_BTD.shape[:2], jnp.int32))
    return jax.jit(lambda p, h, b: part.apply(p, h, ctx, state={"bias_E": b}))(p, h_BTD, bias_E)


@pytest.mark.parametrize("fields", [{}, {"router": "topk_softmax", "n_shared_experts": 0},
                                    {"capacity_factor": 0.5}, {"capacity_factor": 1.0, "top_k": 1},
                                    {"capacity_factor": 0.75, "router": "topk_softmax"}],
                         ids=["dropless", "topk_softmax", "cf0.5", "cf1-top1", "cf0.75-topk_sm"])
def test_part_equals_naive_reference(fields):
    cfg = _with_moe(MOE_MICRO, **fields)
    part, p = _moe_part(cfg), _one_layer(cfg)
    h_BTD = jax.random.normal(jax.random.PRNGKey(4), (B, T, cfg.d_model))
    bias_E = jnp.array([0.0, 0.02, -0.01, 0.03])
    y, aux, new = _apply_part(part, p, h_BTD, bias_E)
    ref, sel, dropped = _naive_moe(part, p, h_BTD.reshape(B * T, -1), bias_E)
    np.testing.assert_allclose(y.reshape(B * T, -1), ref, **F32_REORDER)
    load = np.bincount(sel.reshape(-1), minlength=4).astype(np.float32)
    np.testing.assert_allclose(aux["max_vio"], (load.max() - load.mean()) / load.mean(), rtol=1e-6)
    np.testing.assert_array_equal(new["bias_E"], bias_E + part.bias_update_rate
                                  * np.sign(load.mean() - load))
    if part.capacity_factor is None:
        assert set(aux) == MOE_AUX
    else:
        assert set(aux) == MOE_AUX | {"dropped_fraction"}
        assert dropped > 0 and float(aux["dropped_fraction"]) == pytest.approx(dropped, abs=1e-7)


def test_capacity_mode_without_drops_equals_dropless():
    cfg = _with_moe(MOE_MICRO, capacity_factor=float(MOE_MICRO.moe.n_experts))
    p = _one_layer(cfg)
    h_BTD = jax.random.normal(jax.random.PRNGKey(5), (B, T, cfg.d_model))
    bias_E = jnp.zeros(4)
    y_cap, aux, _ = _apply_part(_moe_part(cfg), p, h_BTD, bias_E)
    y_free, _, _ = _apply_part(_moe_part(MOE_MICRO), p, h_BTD, bias_E)
    assert float(aux["dropped_fraction"]) == 0
    np.testing.assert_allclose(y_cap, y_free, **F32_REORDER)


def test_capacity_mode_drops_through_the_model_and_the_gradient_flows():
    cfg = _with_moe(MOE_MICRO, capacity_factor=0.5)
    params = jscale.init(jax.random.PRNGKey(0), cfg)
    tokens = _tokens(cfg)
    logits, aux = jax.jit(lambda p: jscale.apply(p, tokens, cfg))(params)
    assert 0 < float(aux["dropped_fraction"]) < 1 and np.all(np.isfinite(logits))
    g = jax.jit(jax.grad(lambda p: jscale.apply(p, tokens, cfg)[0].sum()))(params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
    assert np.abs(g["moe_layers"]["moe"]["w_gate_LEDF"]).sum() > 0


# ---------------------------------------------------------------------------------------------------
# router losses, metrics and the bias


def test_load_balance_loss_worked_example_and_perfect_balance():
    probs = jnp.array([[.7, .2, .1], [.1, .8, .1], [.6, .3, .1], [.2, .2, .6]])
    idx = jnp.argmax(probs, -1)[:, None]  # k = 1
    assert float(moe_lib.load_balance_loss(probs, idx, 1.0)) == pytest.approx(1.05, rel=1e-6)
    assert float(moe_lib.load_balance_loss(probs, idx, 0.1)) == pytest.approx(0.105, rel=1e-6)
    uniform = jnp.full((8, 4), 0.25)
    balanced = jnp.array([[0, 1], [2, 3]] * 4)  # k = 2, every expert 4 of the 16 assignments
    assert float(moe_lib.load_balance_loss(uniform, balanced, 0.3)) == pytest.approx(0.3, rel=1e-6)


def test_router_z_loss_value():
    logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 5.0, 2.0]])
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    assert float(moe_lib.router_z_loss(logits, 0.01)) == pytest.approx(0.01 * np.mean(lse ** 2),
                                                                       rel=1e-6)


def test_max_vio_and_bias_update_sign_rule():
    load = jnp.array([5.0, 1.0, 3.0, 3.0])  # mean 3
    assert float(moe_lib.max_violation(load)) == pytest.approx(2 / 3)
    bias = jnp.array([0.1, 0.0, -0.2, 0.0])
    np.testing.assert_allclose(moe_lib.update_bias(bias, load, 0.01),
                               [0.1 - 0.01, 0.01, -0.2, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(moe_lib.update_bias(bias, load, 0.0), bias)


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
def test_bias_changes_selection_not_gate_weights(router):
    logits = jax.random.normal(jax.random.PRNGKey(6), (16, 4))
    idx0, gates0, probs = moe_lib.route(logits, jnp.zeros(4), top_k=2, router=router)
    bias = jnp.array([0.0, 0.0, 100.0, 0.0])
    idx1, gates1, _ = moe_lib.route(logits, bias, top_k=2, router=router)
    assert np.all(np.any(np.asarray(idx1) == 2, -1))  # the biased expert is always chosen
    assert not np.array_equal(idx0, idx1)
    if router == "softmax_topk":  # the unbiased probabilities of the chosen experts
        np.testing.assert_array_equal(gates1, np.take_along_axis(np.asarray(probs), idx1, -1))
    else:  # a softmax over the unbiased logits of the chosen experts
        chosen = np.take_along_axis(np.asarray(logits), np.asarray(idx1), -1)
        np.testing.assert_allclose(gates1, np.exp(chosen) / np.exp(chosen).sum(-1, keepdims=True),
                                   rtol=1e-6)
    # Where the selection is unchanged, so are the gates.
    same = np.all(np.sort(idx0, -1) == np.sort(idx1, -1), -1)
    np.testing.assert_array_equal(np.sort(gates0, -1)[same], np.sort(gates1, -1)[same])


def test_bias_state_through_the_model():
    """The new bias follows this batch's loads; it is read by the next pass and has no gradient."""
    cfg = MOE_MICRO
    params = jscale.init(jax.random.PRNGKey(0), cfg)
    tokens = _tokens(cfg)
    fwd = jax.jit(lambda p, s: models.forward(p, tokens, cfg, model_state=s))
    state0 = models.init_model_state(cfg)
    assert jax.tree.map(jnp.shape, state0) == {"moe_layers": {"moe": {"bias_LE": (2, 4)}}}
    logits0, _, state1 = fwd(params, state0)
    b1 = np.asarray(state1["moe_layers"]["moe"]["bias_LE"])
    assert set(np.unique(b1)) <= set(np.float32([-0.01, 0.0, 0.01])) and np.any(b1 != 0)
    logits1, _, _ = fwd(params, {"moe_layers": {"moe": {"bias_LE": jnp.asarray(b1) * 1e3}}})
    assert not np.allclose(logits1, logits0)  # the bias is read: it changes the selection
    g = jax.grad(lambda p: models.forward(p, tokens, cfg)[2]["moe_layers"]["moe"]["bias_LE"].sum())
    assert all(np.all(x == 0) for x in jax.tree.leaves(g(params)))


# ---------------------------------------------------------------------------------------------------
# layers, counts, aux over a mixed stack


@pytest.mark.parametrize("n_layers, first, every, want", [
    (4, 0, 1, (0, 1, 2, 3)), (4, 1, 1, (1, 2, 3)), (4, 0, 2, (1, 3)), (5, 1, 2, (2, 4)),
    (6, 1, 2, (2, 4)), (5, 0, 3, (2,)), (3, 2, 1, (2,))])
def test_moe_layer_pattern_and_stacks(n_layers, first, every, want):
    cfg = dataclasses.replace(MOE_MICRO, n_layers=n_layers, moe=dataclasses.replace(
        MOE_MICRO.moe, first_dense_layers=first, every=every))
    assert moe_layer_indices(cfg) == want
    stacks = transformer.spec(cfg).layer_stacks
    n_moe = sum(st.n_steps for st in stacks if st.key == "moe_layers")
    assert n_moe == len(want)
    layers = sum(st.n_steps * sum(isinstance(s.part, (MoE, SwiGLU)) for s in st.block)
                 for st in stacks)
    assert layers == n_layers
    tree = jax.eval_shape(lambda: jscale.init(jax.random.PRNGKey(0), cfg))
    assert set(tree) == {"embed", "final_norm"} | {st.key for st in stacks}


def test_counts_by_hand():
    """A mixed stack (dense, dense, MoE, dense), untied, with a shared expert."""
    cfg = dataclasses.replace(MOE_MICRO, n_layers=4, tie_embeddings=False, moe=dataclasses.replace(
        MOE_MICRO.moe, first_dense_layers=1, every=2))
    D, V, F, H, G, K = 32, 61, 64, 4, 2, 8
    E, k, Fe, S = 4, 2, 16, 16
    attn = D * H * K + 2 * D * G * K + H * K * D
    dense_layer = attn + 3 * D * F + 2 * D
    routed = E * 3 * D * Fe
    moe_layer = attn + D * E + routed + 3 * D * S + 2 * D
    non_embedding = 3 * dense_layer + moe_layer + D
    counts = jscale.count_params(cfg)
    assert counts == {"total": non_embedding + 2 * V * D, "non_embedding": non_embedding,
                      "embedding": 2 * V * D, "with_head": non_embedding + V * D,
                      "active": non_embedding + 2 * V * D - (E - k) * 3 * D * Fe}
    tree = jax.eval_shape(lambda: jscale.init(jax.random.PRNGKey(0), cfg))
    assert counts["total"] == sum(x.size for x in jax.tree.leaves(tree))
    fpt = jscale.flops_per_token(cfg, 16)
    attn_flops = 2 * attn + 4 * 16 * H * K
    assert fpt["forward"] == (4 * attn_flops + 3 * 2 * 3 * D * F + 2 * D * E + k * 2 * 3 * D * Fe
                              + 2 * 3 * D * S + 2 * D * V)


def test_aux_is_averaged_over_moe_layers_only():
    """Dense layers in a mixed stack do not dilute the MoE layers' aux values."""
    cfg = dataclasses.replace(MOE_MICRO, n_layers=4, moe=dataclasses.replace(
        MOE_MICRO.moe, first_dense_layers=1, every=2))  # MoE layer 2 only
    params = jscale.init(jax.random.PRNGKey(0), cfg)
    tokens = _tokens(cfg)
    _, aux = jax.jit(lambda p: jscale.apply(p, tokens, cfg))(params)
    # The one MoE layer's values by hand: run the model up to it.
    fam = models.family_of(cfg)
    spec = transformer.spec(cfg)
    x = fam.embed(params, tokens, cfg)
    ctx = lm.Context(segment_ids_BT=None, positions_BT=jnp.broadcast_to(jnp.arange(T), (B, T)))
    stacks = spec.layer_stacks
    x, _, _ = lm._run_stack(params["layers"], x, stacks[0], spec, ctx, {}, {})
    p = nn.unstack_names(jax.tree.map(lambda a: a[0], params["moe_layers"]))
    for sub in stacks[1].block:
        h = nn.rms_norm(x, p[sub.norm]["scale_D"], spec.norm_eps)
        y, part_aux, _ = sub.part.apply(p[sub.name], h, ctx, prepared=sub.part.prepare(ctx),
                                        state={"bias_E": jnp.zeros(4)})
        x = x + y
    tree_allclose(aux, part_aux, **F32_REORDER)


# ---------------------------------------------------------------------------------------------------
# config: validation, CLI keys, sweep axes


@pytest.mark.parametrize("updates, match", [
    ({"model.moe.top_k": 9}, r"^model\.moe\.top_k: must be <= model\.moe\.n_experts=8"),
    ({"model.moe.n_experts": 0}, r"^model\.moe\.n_experts: must be >= 1"),
    ({"model.moe.d_expert": 0}, r"^model\.moe\.d_expert: must be > 0"),
    ({"model.moe.d_expert": -4}, r"^model\.moe\.d_expert: must be > 0"),
    ({"model.moe.capacity_factor": 0}, r"^model\.moe\.capacity_factor: must be > 0"),
    ({"model.moe.capacity_factor": -1.5}, r"^model\.moe\.capacity_factor: must be > 0"),
    ({"model.moe.first_dense_layers": 2}, r"^model\.moe\.first_dense_layers: must be < "
                                          r"model\.n_layers=2"),
    ({"model.moe.first_dense_layers": -1}, r"^model\.moe\.first_dense_layers: must be >= 0"),
    ({"model.moe.every": 3}, r"^model\.moe\.every: must be <= model\.n_layers"),
    ({"model.moe.every": 0}, r"^model\.moe\.every: must be >= 1"),
    ({"model.moe.router": "sinkhorn"}, r"^model\.moe\.router"),
    ({"model.moe.load_balance_coeff": -0.1}, r"^model\.moe\.load_balance_coeff: must be >= 0"),
    ({"model.moe.bias_update_rate": -1}, r"^model\.moe\.bias_update_rate: must be >= 0"),
    ({"model.n_layers": 1, "model.moe.first_dense_layers": 1},
     r"^model\.moe\.first_dense_layers: must be < model\.n_layers=1"),
])
def test_bad_input_names_the_field(updates, match):
    with pytest.raises(ConfigError, match=match):
        jscale.presets.get("moe-tiny").override(updates)


def test_expert_mesh_axis_without_experts_is_refused():
    from jscale import core
    with pytest.raises(ConfigError, match=r"^mesh\.expert: the model has no experts"):
        core.make_layout(micro_cfg(["mesh.expert=2", "mesh.data=4"]))
    assert core.make_layout(micro_cfg(["mesh.expert=2", "mesh.data=4"], preset="moe-tiny"))


def test_cli_keys_and_sweep_axes_reach_the_moe_config():
    cfg = micro_cfg(["model.moe.n_experts=8"])  # tiny has no MoE: built from the defaults
    assert cfg.model.moe == MoEConfig(n_experts=8)
    cfg = jscale.presets.get("moe-tiny").override(parse_overrides(
        ["model.moe.capacity_factor=1.25", "model.moe.router=topk_softmax", "model.moe.impl=xla",
         "model.moe.d_expert=none"]))
    assert cfg.model.moe.capacity_factor == 1.25 and cfg.model.moe.router == "topk_softmax"
    assert cfg.model.d_expert == cfg.model.d_ff
    assert "model.moe.n_experts" in cfg.valid_keys()
    assert micro_cfg(["model.moe=none"], preset="moe-tiny").model.moe is None
    runs = sweep.product(jscale.presets.get("moe-tiny"), **{"model.moe.top_k": [1, 2]})
    assert [r.model.moe.top_k for r in runs] == [1, 2] and len({sweep.run_id(r) for r in runs}) == 2
    d = json.loads(json.dumps(runs[0].to_dict()))
    assert d["model"]["moe"]["top_k"] == 1 and jscale.RunConfig.from_dict(d) == runs[0]


def test_grouped_matmul_impls():
    lhs = jax.random.normal(jax.random.PRNGKey(7), (10, 6))
    rhs = jax.random.normal(jax.random.PRNGKey(8), (3, 6, 5))
    sizes = jnp.array([4, 0, 6], jnp.int32)  # an empty group
    out = moe_lib.grouped_matmul(lhs, rhs, sizes, impl="xla")
    ref = np.concatenate([lhs[:4] @ rhs[0], lhs[4:] @ rhs[2]])
    np.testing.assert_allclose(out, ref, **F32_REORDER)
    with pytest.raises(ValueError, match="impl 'nope'"):
        moe_lib.grouped_matmul(lhs, rhs, sizes, impl="nope")
    try:
        import pallas_kernels.grouped_matmul  # noqa: F401
    except ImportError:
        pytest.skip("pallas_kernels.grouped_matmul is not there yet: the xla path only")
    np.testing.assert_allclose(moe_lib.grouped_matmul(lhs, rhs, sizes, impl="pallas"), ref,
                               **F32_REORDER)


# ---------------------------------------------------------------------------------------------------
# training (slow)


MICRO = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
         "model.moe.d_expert=16", "model.moe.n_experts=4", "model.moe.bias_update_rate=0.01",
         "train.seq_len=32", "train.batch_size=4", "train.steps=24", "train.log_every=4",
         "train.eval_every=12", "train.eval_batches=2", "train.checkpoint_every=8",
         "optim.warmup_steps=4"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """``moe-tiny`` (MICRO) trained through the CLI in this process: the reference the resumed
    subprocess must reproduce bitwise."""
    from jscale.cli import main as cli_main
    out = tmp_path_factory.mktemp("moe_ref")
    assert cli_main(train_args(out, MICRO, preset="moe-tiny")) == 0
    return out


@pytest.mark.slow
def test_moe_tiny_trains_from_the_cli_and_logs_router_metrics(moe_run):
    rows = metrics_rows(moe_run)
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
    for r in rows:
        assert MOE_AUX <= set(r) and all(np.isfinite(r[k]) for k in MOE_AUX)
    assert rows[-1]["loss"] < rows[0]["loss"]
    cfg = micro_cfg(MICRO, preset="moe-tiny")
    summary = json.loads((moe_run / "summary.json").read_text())
    assert summary["n_params"] == jscale.count_params(cfg.model)["total"]
    from jscale.train import load_state
    bias = np.asarray(load_state(cfg, moe_run).model_state["moe_layers"]["moe"]["bias_LE"])
    assert bias.shape == (2, 4) and np.any(bias != 0)  # the router bias was trained and saved




@pytest.mark.slow
def test_moe_resumes_bitwise_after_sigkill_including_the_router_bias(moe_run, tmp_path):
    out = tmp_path / "killed"
    # past the first checkpoint (step 8), mid-training
    kill_mid_training(train_args(out, MICRO, preset="moe-tiny"), out, after_step=12)
    finish(subprocess.Popen([sys.executable, "-m", "jscale.cli",
                             *train_args(out, MICRO, preset="moe-tiny")], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert metrics_rows(out) == metrics_rows(moe_run)
    from jscale.train import load_state
    cfg = micro_cfg(MICRO, preset="moe-tiny")
    jax.tree.map(np.testing.assert_array_equal, load_state(cfg, out), load_state(cfg, moe_run))


@pytest.mark.slow
def test_vmapped_moe_sweep_equals_sequential(tmp_path):
    base = micro_cfg(MICRO + ["train.steps=12", "train.checkpoint_every=0"], preset="moe-tiny")
    runs = sweep.zip_(base, **{"optim.lr": [3e-3, 1e-3], "train.seed": [0, 1]})
    vm = sweep.run(runs, tmp_path / "vmap", strategy="vmap", progress=False)
    seq = sweep.run(runs, tmp_path / "seq", strategy="sequential", progress=False)
    assert set(vm["strategy"]) == {"vmap"} and vm["group_size"].tolist() == [2, 2]
    for col in ("final_train_loss", "final_eval_loss", "min_eval_loss"):
        np.testing.assert_allclose(vm[col], seq[col], **SWEEP_VMAP_VS_SEQUENTIAL)


def test_remat_and_bfloat16():
    params = jscale.init(jax.random.PRNGKey(0), MOE_MICRO)
    tokens = _tokens(MOE_MICRO)

    def grads(cfg):
        return jax.jit(jax.grad(lambda p: jscale.apply(p, tokens, cfg)[0].sum()))(params)
    tree_allclose(grads(dataclasses.replace(MOE_MICRO, remat="full")), grads(MOE_MICRO), **F32_GRAD)
    bf16 = dataclasses.replace(MOE_MICRO, dtype="bfloat16", param_dtype="bfloat16")
    p16 = jscale.init(jax.random.PRNGKey(0), bf16)
    assert p16["moe_layers"]["moe"]["w_router_LDE"].dtype == jnp.float32  # the router stays f32
    assert p16["moe_layers"]["moe"]["w_gate_LEDF"].dtype == jnp.bfloat16
    logits, aux = jax.jit(lambda p: jscale.apply(p, tokens, bf16))(p16)
    assert np.all(np.isfinite(logits)) and all(np.isfinite(float(v)) for v in aux.values())


def test_pallas_dispatch_equals_xla():
    """``model.moe.impl="pallas"`` (the grouped-matmul kernel; interpret mode on CPU) ≡ ragged_dot:
    logits and gradients."""
    try:
        import pallas_kernels.grouped_matmul  # noqa: F401
    except ImportError:
        pytest.skip("pallas_kernels.grouped_matmul is not there yet")
    params = jscale.init(jax.random.PRNGKey(0), MOE_MICRO)
    tokens, targets = _tokens(MOE_MICRO), _tokens(MOE_MICRO, seed=2)
    pallas = _with_moe(MOE_MICRO, impl="pallas")

    def loss(p, cfg):
        logits = jscale.apply(p, tokens, cfg)[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    def run(cfg):
        return jax.jit(jax.value_and_grad(lambda p: loss(p, cfg)))(params)
    (v_x, g_x), (v_p, g_p) = run(MOE_MICRO), run(pallas)
    np.testing.assert_allclose(v_p, v_x, **F32_REORDER)
    tree_allclose(g_p, g_x, **F32_GRAD)


def test_capacity_mode_flops_vs_xla():
    """Capacity mode computes the padded buffers: ``E·C`` rows per projection instead of the ``T·k``
    active ones, so XLA's count is the analytic (active) count plus the routed experts' FLOPs scaled
    by ``E·C / (T·k) − 1`` (the dropless ragged_dot path is checked in the family table)."""
    from tolerances import FLOPS_VS_XLA_RTOL
    from xla_cost import forward_flops
    cfg = dataclasses.replace(MOE_MICRO, d_model=128, n_heads=4, d_ff=384, vocab_size=257,
                              scan_layers=False,
                              moe=dataclasses.replace(MOE_MICRO.moe, d_expert=128,
                                                      capacity_factor=1.5))
    batch, seq = 2, 64
    m, n_tok = cfg.moe, 2 * 64
    C = moe_lib.capacity(n_tok, m.top_k, m.n_experts, m.capacity_factor)
    routed = m.top_k * 2 * 3 * cfg.d_model * cfg.d_expert * cfg.n_layers
    want = jscale.flops_per_token(cfg, seq)["forward"] + routed * (
        m.n_experts * C / (n_tok * m.top_k) - 1)
    np.testing.assert_allclose(forward_flops(cfg, batch, seq), want * batch * seq,
                               rtol=FLOPS_VS_XLA_RTOL)


@pytest.mark.parametrize("preset", ["moe-tiny", "moe-small"])
@pytest.mark.parametrize("platform, variant", [("cuda", "gpu"), ("tpu", "tpu")])
def test_preset_train_loss_and_grad_with_pallas_dispatch_lower_for_hardware(preset, platform,
                                                                          variant, monkeypatch):
    """The MoE presets' training loss and gradient with ``model.moe.impl="pallas"`` export for CUDA
    (Triton) and TPU (Mosaic) at the preset's batch, length and dtype: every MoE layer's three
    grouped matmuls run the kernel forward, and its backward adds d-lhs and d-rhs kernels.

    The model's own call, except that the kernel is built for ``variant`` instead of this CPU host's
    interpret mode. Triton IR is not among jax.export's stable custom-call targets, so the CUDA
    export names it as an accepted exception (as tests/test_grouped_matmul.py does)."""
    from jscale.core import loss_fn
    from pallas_kernels.grouped_matmul import grouped_matmul as kernel

    cfg = jscale.presets.get(preset).override({"model.moe.impl": "pallas"})
    model = cfg.model
    # The package, not `pallas_kernels.grouped_matmul` the attribute (the re-exported function).
    package = importlib.import_module("pallas_kernels.grouped_matmul")
    monkeypatch.setattr(package, "grouped_matmul", functools.partial(
        kernel, interpret=False, platform=variant))
    params = jax.eval_shape(lambda: jscale.init(jax.random.PRNGKey(0), model))
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("inputs", "targets", "segment_ids")}
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, model)[0]))
    target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    checks = [jax.export.DisabledSafetyCheck.custom_call(target)] if platform == "cuda" else []
    exported = jax.export.export(loss_and_grad, platforms=[platform],
                                 disabled_checks=checks)(params, batch)
    # In the layer scan: 3 forward grouped matmuls, and per projection a d-lhs and a d-rhs kernel.
    assert exported.mlir_module().count(f"custom_call @{target}") >= 9
