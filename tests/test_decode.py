"""Incremental decode (jscale.models.decode, the parts' ``init_cache``/``decode``, the façade's
``decode_init``/``decode_step``/``generate``): token by token from an empty cache ≡ the full pass,
for the dense transformer, the multi-stack MoE and Mamba; prefixes preloaded into the cache ≡ the
full pass with the same layer inputs (per row, per stream, and ParScale composed from the scaffold's
functions); a full cache; what decode refuses."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import MAMBA_MICRO, MOE_MICRO, PARSCALE_MICRO, TRANSFORMER_MICRO
from tolerances import F32_REORDER

from jscale import mesh as mesh_lib
from jscale import models, sharding
from jscale.config import MeshConfig
from jscale.models import decode, lm, parscale, transformer
from jscale.models.moe import MoEConfig
from jscale.models.parts.attention import Attention
from jscale.models.parts.base import Leaf, Normal, Part

B, T = 2, 7

#: The multi-stack MoE: stacks ``layers`` (1 dense), ``moe_layers`` (one period: dense, MoE) and
#: ``tail_layers`` (1 dense).
MOE_STACKS = dataclasses.replace(MOE_MICRO, n_layers=4, moe=dataclasses.replace(
    MOE_MICRO.moe, first_dense_layers=1, every=2))

CONFIGS = {
    "dense_gqa": TRANSFORMER_MICRO,
    "dense_qknorm_bias_untied": dataclasses.replace(TRANSFORMER_MICRO, qk_norm=True, qkv_bias=True,
                                                    tie_embeddings=False),
    "dense_mha_loop": dataclasses.replace(TRANSFORMER_MICRO, n_kv_heads=4, scan_layers=False),
    "moe_stacks": MOE_STACKS,
    "moe_stacks_loop": dataclasses.replace(MOE_STACKS, scan_layers=False),
    "mamba": MAMBA_MICRO,
}


def _params(cfg, seed=0):
    """Initialized parameters with every leaf perturbed (zero-initialized biases, unit norm scales
    and a zero aggregator would hide a mistake)."""
    rng = np.random.default_rng(seed + 100)
    return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32),
                        models.init(jax.random.key(seed), cfg))


def _tokens(cfg, rows=B, length=T, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (rows, length)),
                       jnp.int32)


def _random_state(cfg, seed=3):
    """Non-trivial model state (the MoE router bias), so that decode must read it."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape, np.float32)),
                        models.init_model_state(cfg))


def _apply(params, tokens_BT, cfg):
    """The full pass's logits (jitted)."""
    return jax.jit(lambda p, t: models.apply(p, t, cfg)[0])(params, tokens_BT)


def _decode_all(params, tokens_BT, cfg, cache, model_state=None):
    """The sequence fed token by token through one jitted step (cache donated): ``logits_BTV``."""
    step = jax.jit(lambda p, tok, c, s: models.decode_step(p, tok, c, cfg, model_state=s),
                   donate_argnums=2)
    out = []
    for t in range(tokens_BT.shape[1]):
        logits_BV, cache = step(params, tokens_BT[:, t], cache, model_state)
        out.append(logits_BV)
    assert step._cache_size() == 1  # one compile: the cache's shapes do not change
    return jnp.stack(out, axis=1), cache


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_equals_full_pass(name):
    cfg = CONFIGS[name]
    params, tokens_BT = _params(cfg), _tokens(cfg)
    state = _random_state(cfg) if cfg is not MAMBA_MICRO else None
    full_BTV = jax.jit(lambda p, t, s: models.forward(p, t, cfg, model_state=s)[0])(
        params, tokens_BT, state)
    cache = models.decode_init(params, cfg, B, T + 2)  # spare slots stay masked
    got_BTV, cache = _decode_all(params, tokens_BT, cfg, cache, state)
    assert got_BTV.dtype == jnp.float32
    np.testing.assert_allclose(got_BTV, full_BTV, **F32_REORDER)
    if cfg is not MAMBA_MICRO:
        assert int(cache["pos"]) == T
        assert set(cache["stacks"]) == {st.key for st in models.family_of(cfg).spec(cfg).layer_stacks}


def test_cache_layout():
    cfg = MOE_STACKS
    cache = models.decode_init(_params(cfg), cfg, B, 5)
    G, K = cfg.n_kv_heads, cfg.k
    shapes = jax.tree.map(jnp.shape, cache)
    kv = {"k_LBSGK": (1, B, 5, G, K), "v_LBSGK": (1, B, 5, G, K), "n_prefix_L": (1,)}
    assert shapes == {"pos": (), "max_len": (), "stacks": {
        "layers": {"attn": kv}, "moe_layers": {"attn_0": kv, "attn": kv},
        "tail_layers": {"attn": kv}}}
    assert cache["stacks"]["layers"]["attn"]["k_LBSGK"].dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------
# prefixes preloaded into the cache


def _row_prefix(cfg, S, rows, seed=5):
    """Per-row prefixes ``{"prefix_k_LBSGK", "prefix_v_LBSGK"}`` for every attention sub-layer."""
    return _make_prefix(cfg, seed, lambda L, G, K: (L, rows, S, G, K),
                        ("prefix_k_LBSGK", "prefix_v_LBSGK"))


def _stream_prefix(cfg, S, P, seed=6):
    """Per-stream prefixes ``{"prefix_k_LPGSK", "prefix_v_LPGSK"}`` for every attention sub-layer."""
    return _make_prefix(cfg, seed, lambda L, G, K: (L, P, G, S, K),
                        ("prefix_k_LPGSK", "prefix_v_LPGSK"))


def _make_prefix(cfg, seed, shape_of, names):
    out = {}
    rng = np.random.default_rng(seed)
    for st in transformer.spec(cfg).layer_stacks:
        for sub in st.block:
            if isinstance(sub.part, Attention):
                shape = shape_of(st.n_steps, sub.part.n_kv_heads, sub.part.head_dim)
                out.setdefault(st.key, {})[sub.name] = {
                    name: jnp.asarray(rng.standard_normal(shape, np.float32)) for name in names}
    return out


def _single_stack_form(cfg, inputs):
    stacks = transformer.spec(cfg).layer_stacks
    return inputs[stacks[0].key] if len(stacks) == 1 else inputs


def _prefixed_case(cfg, inputs, rows):
    """Full pass with ``inputs`` as layer inputs vs decode from a cache preloaded with them."""
    params, tokens_BT = _params(cfg), _tokens(cfg, rows=rows)
    state = _random_state(cfg) if cfg.moe is not None else None
    full_BTV = jax.jit(lambda p, t, i, s: models.forward(p, t, cfg, layer_inputs=i,
                                                         model_state=s)[0])(
        params, tokens_BT, inputs, state)
    spec = transformer.spec(cfg)
    cache = jax.jit(lambda i: decode.init_cache(spec, rows, T, layer_inputs=i))(inputs)
    got_BTV, _ = _decode_all(params, tokens_BT, cfg, cache, state)
    np.testing.assert_allclose(got_BTV, full_BTV, **F32_REORDER)
    return full_BTV


def test_per_row_prefix_preloaded_equals_full_pass():
    cfg = dataclasses.replace(TRANSFORMER_MICRO, qk_norm=True)
    inputs = _single_stack_form(cfg, _row_prefix(cfg, S=3, rows=B))
    cache = decode.init_cache(transformer.spec(cfg), B, T, layer_inputs=inputs)
    kv = cache["stacks"]["layers"]["attn"]
    assert kv["k_LBSGK"].shape[2] == 3 + T and np.all(np.asarray(kv["n_prefix_L"]) == 3)
    np.testing.assert_array_equal(kv["k_LBSGK"][:, :, :3], inputs["attn"]["prefix_k_LBSGK"])
    full_BTV = _prefixed_case(cfg, inputs, B)
    plain_BTV = _apply(_params(cfg), _tokens(cfg), cfg)
    assert np.abs(np.asarray(full_BTV - plain_BTV)).min() > 0  # the prefix changes every position


def test_per_stream_prefix_on_stream_major_rows_multi_stack():
    """Two streams of two rows each (row ``p·2 + b`` is stream ``p``), through every stack of the
    multi-stack MoE."""
    _prefixed_case(MOE_STACKS, _stream_prefix(MOE_STACKS, S=4, P=2), rows=2 * B)


def test_parscale_decode_composes_from_the_scaffold():
    """What a ParScale decode does, written with the scaffold's functions: the token's embedding
    tiled over the P streams (stream-major), the per-stream prefixes preloaded, hidden_step, the
    aggregation after the final norm, the head ≡ ParScale's full pass."""
    cfg = PARSCALE_MICRO
    P, spec = cfg.n_streams, transformer.spec(cfg.base)
    params, tokens_BT = _params(cfg), _tokens(cfg)
    full_BTV = _apply(params, tokens_BT, cfg)

    @jax.jit
    def step(params, token_B, cache):
        x_BD = lm.embed(params, token_B[:, None], spec)[:, 0]
        h_BD, cache = decode.hidden_step(params, jnp.tile(x_BD, (P, 1)), cache, spec)
        h_BD, _ = parscale.aggregate(params, h_BD.reshape(P, 1, B, -1), cfg.smoothing)
        return lm.logits(params, h_BD[0], spec), cache

    cache = decode.init_cache(spec, P * B, T, layer_inputs=parscale.stream_inputs(params, cfg))
    out = []
    for t in range(T):
        logits_BV, cache = step(params, tokens_BT[:, t], cache)
        out.append(logits_BV)
    np.testing.assert_allclose(jnp.stack(out, 1), full_BTV, **F32_REORDER)


@dataclasses.dataclass(frozen=True)
class Shift(Part):
    """A test-only position-wise part with a per-layer input: ``h * w_D + shift_D``."""

    position_wise = True

    d_model: int

    def leaves(self):
        return [Leaf(("w_D",), (self.d_model,), Normal(1.0 / math.sqrt(self.d_model)))]

    def apply(self, p, h_BTD, ctx, *, prepared=None, state=None, layer_input=None):
        return h_BTD * p["w_D"] + layer_input["shift_D"], {}, {}

    def count(self):
        return self.d_model

    def flops(self, seq_len):
        return 2 * self.d_model


def test_a_position_wise_part_keeps_its_layer_input_in_the_cache():
    """The default ``init_cache`` keeps a position-wise part's layer input for every step."""
    base = transformer.spec(TRANSFORMER_MICRO)
    spec = dataclasses.replace(base, block=(base.block[0], lm.Sublayer("shift", "shift_norm",
                                                                        Shift(base.d_model))))
    params = jax.jit(lm.init, static_argnums=1)(jax.random.key(0), spec)
    L, D = base.n_layers, base.d_model
    inputs = {"shift": {"shift_LD": jnp.asarray(np.random.default_rng(2).standard_normal(
        (L, D), np.float32))}}
    tokens_BT = _tokens(TRANSFORMER_MICRO)
    x_BTD = lm.embed(params, tokens_BT, spec)
    full_BTV = jax.jit(lambda p, x, i: lm.head(p, lm.hidden(p, x, spec, layer_inputs=i)[0], spec))(
        params, x_BTD, inputs)
    cache = decode.init_cache(spec, B, T, layer_inputs=inputs)
    assert cache["stacks"]["layers"]["shift"]["layer_input"]["shift_LD"].shape == (L, D)
    step = jax.jit(lambda c, x: decode.hidden_step(params, x, c, spec))
    out = []
    for t in range(T):
        h_BD, cache = step(cache, x_BTD[:, t])
        out.append(lm.logits(params, h_BD, spec))
    np.testing.assert_allclose(jnp.stack(out, 1), full_BTV, **F32_REORDER)


def test_layer_inputs_naming_no_sublayer_are_refused():
    spec = transformer.spec(TRANSFORMER_MICRO)
    with pytest.raises(ValueError, match="'atn'.*sub-layers are"):
        decode.init_cache(spec, B, T, layer_inputs={"atn": {}})
    with pytest.raises(ValueError, match="stack 'moe'.*stacks are"):
        decode.init_cache(transformer.spec(MOE_STACKS), B, T, layer_inputs={"moe": {}})


@pytest.mark.parametrize("name,mesh", [("dense_gqa", dict(data=2, fsdp=2, tensor=2)),
                                       ("moe_stacks", dict(data=2, expert=4))])
def test_sharded_decode_equals_unsharded(name, mesh):
    """On 8 devices (FSDP + tensor parallel; expert parallel): the cache is placed by its names'
    dims (rows over the batch axes, kv heads over ``tensor``) and the logits are one device's."""
    cfg, rows = CONFIGS[name], 4
    params, tokens_BT = _params(cfg), _tokens(cfg, rows=rows)
    want_BTV, _ = _decode_all(params, tokens_BT, cfg, models.decode_init(params, cfg, rows, T))
    layout = sharding.Layout(mesh_lib.make_mesh(MeshConfig(**mesh)))
    params = jax.device_put(params, sharding.tree_shardings(params, layout.mesh))
    cache = jax.jit(sharding.traced_under(layout, lambda p: models.decode_init(p, cfg, rows, T)))(
        params)
    step = jax.jit(sharding.traced_under(layout, lambda p, tok, c: models.decode_step(p, tok, c, cfg)),
                   donate_argnums=2)
    out = []
    for t in range(T):
        logits_BV, cache = step(params, tokens_BT[:, t], cache)
        out.append(logits_BV)
    k_spec = cache["stacks"]["layers"]["attn"]["k_LBSGK"].sharding.spec
    assert k_spec[1] == (("data", "fsdp") if "fsdp" in mesh else "data")
    np.testing.assert_allclose(jnp.stack(out, 1), want_BTV, **F32_REORDER)


# ---------------------------------------------------------------------------------------------------
# greedy generation and a full cache


@pytest.mark.parametrize("name", ["dense_gqa", "mamba"])
def test_generate_is_greedy_on_the_full_pass(name):
    cfg = CONFIGS[name]
    params, prompt_BT, n_new = _params(cfg), _tokens(cfg, length=4), 5
    new_BT, logits_BTV = models.generate(params, prompt_BT, cfg, n_new)
    assert new_BT.shape == (B, n_new) and new_BT.dtype == jnp.int32
    assert logits_BTV.shape == (B, n_new, cfg.vocab_size)
    seq_BT = jnp.concatenate([prompt_BT, new_BT[:, :-1]], axis=1)
    full_BTV = _apply(params, seq_BT, cfg)[:, prompt_BT.shape[1] - 1:]
    np.testing.assert_allclose(logits_BTV, full_BTV, **F32_REORDER)
    np.testing.assert_array_equal(new_BT, jnp.argmax(full_BTV, axis=-1))


def test_a_full_cache():
    cfg = TRANSFORMER_MICRO
    params, tokens_BT = _params(cfg), _tokens(cfg, length=3)
    with pytest.raises(ValueError, match="need a cache of 7 tokens; max_len=6"):
        models.generate(params, tokens_BT, cfg, 4, max_len=6)
    cache = models.decode_init(params, cfg, B, 2)
    step = jax.jit(lambda c, tok: models.decode_step(params, tok, c, cfg))
    for t in range(2):
        logits_BV, cache = step(cache, tokens_BT[:, t])
        assert np.all(np.isfinite(logits_BV))
    logits_BV, _ = step(cache, tokens_BT[:, 2])  # under jit: NaN past the capacity
    assert np.all(np.isnan(logits_BV))
    with pytest.raises(ValueError, match="decode cache is full: it holds max_len=2"):
        models.decode_step(params, tokens_BT[:, 2], cache, cfg)  # outside jit: an error


# ---------------------------------------------------------------------------------------------------
# what decode refuses


def test_moe_capacity_mode_is_refused():
    cfg = dataclasses.replace(MOE_MICRO, moe=dataclasses.replace(MOE_MICRO.moe,
                                                                 capacity_factor=1.25))
    assert isinstance(cfg.moe, MoEConfig)
    with pytest.raises(ValueError, match=r"model\.moe\.capacity_factor=1\.25"):
        models.decode_init(None, cfg, B, T)


def test_a_part_that_mixes_positions_needs_its_own_decode():
    """The scaffold refuses the Mamba mixer (whose family decodes with its own recurrence)."""
    from jscale.models import mamba
    with pytest.raises(NotImplementedError, match="MambaMixer mixes positions"):
        decode.init_cache(mamba.spec(MAMBA_MICRO), B, T)
