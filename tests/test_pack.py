"""Exact padded packing of different shapes (jscale.models.packing): members of different widths
and depths, zero-padded to one shape, compute exactly what they compute alone — logits, gradients,
loss curves under the training core vmapped over the members (one compile) — and their padded
entries stay exactly zero. Tolerances: float32 reassociation only (the true entries' sums see extra
zero terms; the vmapped step batches the matmuls)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from families import MAMBA_MICRO, TRANSFORMER_MICRO
from tolerances import F32_GRAD, F32_REORDER, SWEEP_VMAP_VS_SEQUENTIAL

from jscale import core, models, nn, optim, presets
from jscale.config import ConfigError
from jscale.models import packing

V, B, T, STEPS = 257, 2, 8, 4  # the training core's byte tokenizer fixes V = 257

_T = dataclasses.replace(TRANSFORMER_MICRO, vocab_size=V, head_dim=8)
#: Widths, depths, head counts and groupings all differ: D 16–32, L 1–3, (H, G) = (2, 1), (3, 3),
#: (4, 2), (4, 1) — R = H/G of 2, 1, 2, 4 — so the padded model has G 3, R 4, H 12 and F 64.
TRANSFORMERS = (
    dataclasses.replace(_T, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32),
    dataclasses.replace(_T, d_model=24, n_layers=2, n_heads=3, n_kv_heads=3, d_ff=48),
    dataclasses.replace(_T, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64),
    dataclasses.replace(_T, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=40),
)
_M = dataclasses.replace(MAMBA_MICRO, vocab_size=V)
#: D 16–32 (inner width F 32–64, Δ rank 1–2), L 1–3, N 4 and 8.
MAMBAS = (
    dataclasses.replace(_M, d_model=16, n_layers=3, d_state=4),
    dataclasses.replace(_M, d_model=24, n_layers=1, d_state=8),
    dataclasses.replace(_M, d_model=32, n_layers=2, d_state=4),
)
FAMILIES = {"transformer": TRANSFORMERS, "mamba": MAMBAS}


def tokens(seed: int, shape=(B, T)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def stack(trees):
    return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def member(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def assert_padding_zero(tree_pad, cfg, cfg_pad, what: str) -> None:
    """Every padded entry of ``tree_pad`` (``cfg_pad``'s parameter tree) is exactly 0."""
    masks = packing.padding_mask(cfg, cfg_pad)
    for (path, x), m in zip(jax.tree_util.tree_flatten_with_path(tree_pad)[0],
                            jax.tree.leaves(masks), strict=True):
        bad = np.count_nonzero(np.asarray(x)[m])
        assert bad == 0, f"{what}: {bad} nonzero padded entries in {jax.tree_util.keystr(path)}"


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ---------------------------------------------------------------------------------------------------
# the padded config


def test_padded_config_takes_the_largest_sizes():
    pad = packing.padded_config(TRANSFORMERS)
    assert (pad.d_model, pad.n_layers, pad.n_kv_heads, pad.n_heads, pad.d_ff, pad.k) == (
        32, 3, 3, 12, 64, 8)
    m = packing.padded_config(MAMBAS)
    assert (m.d_model, m.n_layers, m.d_state, m.d_inner, m.rank, m.dt_rank) == (
        32, 3, 8, 64, 2, "auto")
    for cfg in (*TRANSFORMERS, *MAMBAS):
        assert packing.padded_config([cfg]) == cfg


@pytest.mark.parametrize("change, field", [
    ({"vocab_size": 61}, "model.vocab_size"), ({"head_dim": 16}, "model.head_dim"),
    ({"qk_norm": True}, "model.qk_norm"), ({"rope_theta": 500.0}, "model.rope_theta")])
def test_unpackable_members_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field) as err:
        packing.padded_config([TRANSFORMERS[0], dataclasses.replace(TRANSFORMERS[2], **change)])
    if field in ("model.vocab_size", "model.head_dim"):
        assert "members differ" in str(err.value)
        assert "share the head dim and the vocabulary" in str(err.value)


def test_unpackable_mamba_and_mixed_families_are_refused():
    with pytest.raises(ConfigError, match="model.expand"):
        packing.padded_config([MAMBAS[0], dataclasses.replace(MAMBAS[1], expand=4)])
    with pytest.raises(ConfigError, match="model.d_conv"):
        packing.padded_config([MAMBAS[0], dataclasses.replace(MAMBAS[1], d_conv=2)])
    with pytest.raises(ConfigError, match="one family"):
        packing.padded_config([TRANSFORMERS[0], MAMBAS[0]])
    with pytest.raises(ConfigError, match="does not fit"):
        packing.pack_params(None, TRANSFORMERS[2], packing.padded_config(TRANSFORMERS[:2]))


# ---------------------------------------------------------------------------------------------------
# packing the parameters


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_init_is_the_members_own_init_padded_with_zeros(family):
    """The true block of a packed init is the member's own init for the same key, bitwise (its own
    fan-in stds, its own draws); every padded entry is 0, norm scales and padded layers included;
    unpack ∘ pack is the identity."""
    cfgs = FAMILIES[family]
    pad = packing.padded_config(cfgs)
    key = jax.random.PRNGKey(3)
    for cfg in cfgs:
        own = models.init(key, cfg)
        packed = packing.init_packed(key, cfg, pad)
        want = jax.eval_shape(lambda k: models.init(k, pad), key)
        assert jax.tree.structure(packed) == jax.tree.structure(want)
        assert all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(
            jax.tree.leaves(packed), jax.tree.leaves(want), strict=True))
        jax.tree.map(np.testing.assert_array_equal, packing.unpack_params(packed, cfg, pad), own)
        assert_padding_zero(packed, cfg, pad, f"init of {models.describe(cfg)}")
        n_true = sum(int(np.count_nonzero(~m)) for m in
                     jax.tree.leaves(packing.padding_mask(cfg, pad)))
        assert n_true == models.count_params(cfg)["total"]


def test_heads_keep_their_kv_group():
    """Head (g, j) of a member sits at g · R_pad + j: query head h of the padded model reads kv
    group h // R_pad, the member's head's own group."""
    cfg, pad = TRANSFORMERS[3], packing.padded_config(TRANSFORMERS)  # G 1, R 4 into G 3, R 4
    w_q = packing.pack_params(models.init(jax.random.PRNGKey(0), cfg), cfg, pad)["layers"]["attn"][
        "w_q_LDHK"]
    assert np.flatnonzero(np.abs(np.asarray(w_q)).sum(axis=(0, 1, 3))).tolist() == [0, 1, 2, 3]
    cfg = TRANSFORMERS[1]  # G 3, R 1: heads 0, 4, 8
    w_q = packing.pack_params(models.init(jax.random.PRNGKey(0), cfg), cfg, pad)["layers"]["attn"][
        "w_q_LDHK"]
    assert np.flatnonzero(np.abs(np.asarray(w_q)).sum(axis=(0, 1, 3))).tolist() == [0, 4, 8]
    mask = packing.pack_state(cfg, pad)["pack"]["head_mask_H"]
    assert np.flatnonzero(np.asarray(mask)).tolist() == [0, 4, 8]


# ---------------------------------------------------------------------------------------------------
# the model math


def test_default_path_is_unchanged():
    """A group of one (the padded model is the member's own, its state names its own sizes) is the
    unpacked model bitwise; ``rms_norm(width=D)`` is the mean bitwise."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 16))
    s = jnp.linspace(0.5, 1.5, 16)
    np.testing.assert_array_equal(nn.rms_norm(x, s, 1e-6, jnp.float32(16)), nn.rms_norm(x, s, 1e-6))
    cfg = TRANSFORMERS[2]
    params, t = models.init(jax.random.PRNGKey(1), cfg), tokens(0)
    f = jax.jit(lambda p, t, s: models.forward(p, t, cfg, model_state=s)[0])
    np.testing.assert_array_equal(f(params, t, packing.pack_state(cfg, cfg)),
                                  f(params, t, models.init_model_state(cfg)))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_and_gradients_are_each_members_own(family):
    """The padded model (one program, vmapped over the members' packed params and states) gives
    every member its own logits and its own gradients (F32_REORDER / F32_GRAD), and exactly zero
    gradients on every padded entry."""
    cfgs = FAMILIES[family]
    pad = packing.padded_config(cfgs)
    t = tokens(1)
    batch = {"inputs": t, "targets": jnp.roll(t, -1, axis=1)}
    own = [models.init(jax.random.PRNGKey(i), c) for i, c in enumerate(cfgs)]
    params = stack([packing.pack_params(p, c, pad) for p, c in zip(own, cfgs, strict=True)])
    states = stack([packing.pack_state(c, pad) for c in cfgs])

    def logits_and_grads(p, s, cfg):
        logits = models.forward(p, t, cfg, model_state=s)[0]
        return logits, jax.grad(lambda p: core.loss_fn(p, batch, cfg, s)[0])(p)
    packed = jax.jit(jax.vmap(lambda p, s: logits_and_grads(p, s, pad)))
    logits_R, grads_R = packed(params, states)
    assert packed._cache_size() == 1
    worst_logits = worst_grads = 0.0
    for i, (cfg, p) in enumerate(zip(cfgs, own, strict=True)):
        want_logits, want_grads = jax.jit(lambda p, c=cfg: logits_and_grads(
            p, models.init_model_state(c), c))(p)
        np.testing.assert_allclose(logits_R[i], want_logits, **F32_REORDER)
        got_grads = member(grads_R, i)
        assert_padding_zero(got_grads, cfg, pad, f"gradients of {models.describe(cfg)}")
        got_grads = packing.unpack_params(got_grads, cfg, pad)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_GRAD), got_grads,
                     want_grads)
        worst_logits = max(worst_logits, max_diff(logits_R[i], want_logits))
        worst_grads = max(worst_grads, max_diff(got_grads, want_grads))
    print(f"\n{family}: max |logits diff| {worst_logits:.3g}, max |grad diff| {worst_grads:.3g}")


# ---------------------------------------------------------------------------------------------------
# training


def run_config(model_cfg, seed: int):
    base = presets.get("mamba-tiny" if isinstance(model_cfg, models.MambaConfig) else "tiny")
    return base.override({"model": model_cfg, "train.batch_size": B, "train.seq_len": T,
                          "train.steps": STEPS, "train.seed": seed, "optim.warmup_steps": 2,
                          "optim.weight_decay": 0.1})


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_group_trains_each_member_as_alone(family):
    """``core.train_step`` vmapped over the packed members (one compile) gives every member the loss
    curve and grad norms of its own unpacked run of the same seed (SWEEP_VMAP_VS_SEQUENTIAL); the
    padded parameters and Adam moments are exactly zero after training."""
    cfgs = FAMILIES[family]
    pad = packing.padded_config(cfgs)
    runs = [run_config(c, seed=i) for i, c in enumerate(cfgs)]
    run_pad = run_config(pad, seed=0)
    optimizer = optim.make_optimizer(run_pad.optim, STEPS)
    data = core.member_data(runs)
    batches = []
    for s in range(STEPS):
        t = tokens(100 + s, (B, T + 1))
        batches.append({"inputs": t[:, :-1], "targets": t[:, 1:]})

    # each member alone
    alone = []
    for i, run in enumerate(runs):
        step = jax.jit(lambda s, b, run=run: core.train_step(s, b, cfg=run, optimizer=optimizer))
        state = core.init_state(run, optimizer, member(data, i))
        curve = []
        for b in batches:
            state, metrics = step(state, b)
            curve.append((metrics["loss"], metrics["grad_norm"]))
        alone.append((state, np.asarray(curve)))

    # packed: each member's own init (same key split as core.init_state), padded
    init_keys = [jax.random.split(k)[0] for k in data["key"]]
    params = stack([packing.init_packed(k, c, pad) for k, c in zip(init_keys, cfgs, strict=True)])
    state = jax.jit(jax.vmap(lambda d, p, s: core.init_state(run_pad, optimizer, d, params=p)
                             .replace(model_state=s)))(
        data, params, stack([packing.pack_state(c, pad) for c in cfgs]))
    step = jax.jit(jax.vmap(lambda s, b: core.train_step(s, b, cfg=run_pad, optimizer=optimizer),
                            in_axes=(0, None)))
    curves = []
    for b in batches:
        state, metrics = step(state, b)
        curves.append(np.stack([metrics["loss"], metrics["grad_norm"]], axis=-1))
    assert step._cache_size() == 1
    curves = np.stack(curves, axis=1)  # [R, steps, (loss, grad_norm)]

    worst_loss = worst_params = 0.0
    for i, cfg in enumerate(cfgs):
        own_state, own_curve = alone[i]
        np.testing.assert_allclose(curves[i], own_curve, **SWEEP_VMAP_VS_SEQUENTIAL)
        got = member(state.params, i)
        assert_padding_zero(got, cfg, pad, f"trained params of {models.describe(cfg)}")
        (adam,) = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
            x, optax.ScaleByAdamState)) if isinstance(x, optax.ScaleByAdamState)]
        assert_padding_zero(member(adam.mu, i), cfg, pad, "Adam's mu")
        assert_padding_zero(member(adam.nu, i), cfg, pad, "Adam's nu")
        # The trained parameters are reported, not compared elementwise: Adam divides each
        # gradient by its own RMS, so an entry whose gradient is tiny (an embedding row of a token
        # the batches hardly use) moves by a full step whatever its size, and the gradients'
        # reassociation error passes into it undamped (measured up to ~2e-5 after 4 steps).
        # Gradients from equal parameters are compared in the test above.
        got = packing.unpack_params(got, cfg, pad)
        worst_loss = max(worst_loss, float(np.max(np.abs(curves[i, :, 0] - own_curve[:, 0]))))
        worst_params = max(worst_params, max_diff(got, own_state.params))
    print(f"\n{family}: max |loss diff| {worst_loss:.3g}, max |param diff| {worst_params:.3g} "
          f"after {STEPS} steps")
