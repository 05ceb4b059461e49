"""The invariants every model family meets, driven by the family table in tests/families.py:
causality, document isolation, counts ≡ tree, leaf-name letters, scan ≡ loop, presets build, config
round trip, bitwise-stable init, FLOPs ≡ XLA's cost analysis; and the registry and façade."""

import dataclasses
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import FAMILIES, INIT_SEED, ROWS, param_hash, row_of, tree_allclose
from tolerances import F32_REORDER, FLOPS_VS_XLA_RTOL
from xla_cost import forward_flops

import jscale
from jscale import models, registry
from jscale.config import ConfigError, DataConfig, RunConfig, TrainConfig
from jscale.models.protocol import Family

#: Parametrize a test over the family table.
per_family = pytest.mark.parametrize("row", FAMILIES, ids=[r.name for r in FAMILIES])
B = 2


def _params(row):
    return _cached_params(row.name)


_PARAMS: dict = {}


def _cached_params(name):
    if name not in _PARAMS:
        _PARAMS[name] = jscale.init(jax.random.PRNGKey(0), ROWS[name].micro)
    return _PARAMS[name]


def _tokens(row, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, row.micro.vocab_size, (B, row.seq_len)), jnp.int32)


def _logits(params, tokens, cfg, **kw):
    return jax.jit(lambda p, t: jscale.apply(p, t, cfg, **kw)[0])(params, tokens)


@per_family
def test_registry_and_protocol(row):
    family = models.family_of(row.micro)
    assert isinstance(family, Family)
    assert family.name == row.family and family.config_cls is type(row.micro)
    assert registry.by_name(row.family) is family and row.family in registry.names()
    assert jscale.config.model_family(row.micro) == row.family
    assert row_of(row.micro) is row
    assert models.init_scale(row.micro) == row.micro.init_scale
    assert models.describe(row.micro) == row.describe
    assert bool(models.init_model_state(row.micro)) == row.stateful
    tree = jax.eval_shape(lambda: jscale.init(jax.random.PRNGKey(0), row.micro))
    dims = {d for path, _ in jax.tree_util.tree_leaves_with_path(tree)
            for d in str(path[-1].key).rsplit("_", 1)[-1] if d != "L"}
    assert dims <= set(models.dim_fields(row.micro)), dims - set(models.dim_fields(row.micro))


@per_family
def test_causality_via_gradients(row):
    params, cfg, T = _params(row), row.micro, row.seq_len
    family = models.family_of(cfg)
    x_BTD = jnp.asarray(np.random.default_rng(3).standard_normal((1, T, cfg.d_model)), jnp.float32)
    t = T // 2

    def out_at_t(x):
        h_BTD, _, _ = family.hidden(params, x, cfg)
        return family.head(params, h_BTD, cfg)[0, t].sum()

    g_TD = np.asarray(jax.jit(jax.grad(out_at_t))(x_BTD)[0])
    assert np.all(g_TD[t + 1:] == 0.0), "future positions influence the past"
    assert np.all(np.abs(g_TD[: t + 1]).sum(-1) > 0), "a past position has no influence"


@per_family
def test_segment_ids_isolate_documents(row):
    params, cfg, T = _params(row), row.micro, row.seq_len
    tokens_BT = _tokens(row)
    seg_BT = jnp.array([[1] * 5 + [2] * (T - 5)] * B)
    changed = tokens_BT.at[:, :5].set((tokens_BT[:, :5] + 1) % cfg.vocab_size)
    base = _logits(params, tokens_BT, cfg, segment_ids_BT=seg_BT)
    other = _logits(params, changed, cfg, segment_ids_BT=seg_BT)
    np.testing.assert_array_equal(base[:, 5:], other[:, 5:])
    assert not np.allclose(base[:, :5], other[:, :5])
    # Without segment ids (or with one segment) the second document does see the first.
    assert not np.allclose(_logits(params, tokens_BT, cfg)[:, 5:], _logits(params, changed, cfg)[:, 5:])
    one = jnp.ones_like(seg_BT)
    assert not np.allclose(_logits(params, tokens_BT, cfg, segment_ids_BT=one)[:, 5:],
                           _logits(params, changed, cfg, segment_ids_BT=one)[:, 5:])


@per_family
def test_scan_equals_unrolled(row):
    params, tokens_BT = _params(row), _tokens(row)
    unrolled = dataclasses.replace(row.micro, scan_layers=False)
    np.testing.assert_allclose(_logits(params, tokens_BT, row.micro),
                               _logits(params, tokens_BT, unrolled), **F32_REORDER)


def _count_cases():
    cases = []
    for row in FAMILIES:
        preset_models = [p.model for p in map(jscale.presets.get, jscale.presets.names())
                         if row_of(p.model) is row]
        assert preset_models, f"no preset of family {row.name}"
        cases += [(row, cfg) for cfg in [*preset_models, row.micro, *row.variants]]
    return cases


@pytest.mark.parametrize("row, cfg", _count_cases(), ids=[r.name for r, _ in _count_cases()])
def test_count_params_equals_tree(row, cfg):
    tree = jax.eval_shape(lambda: jscale.init(jax.random.PRNGKey(0), cfg))
    counts = jscale.count_params(cfg)
    assert counts["total"] == sum(x.size for x in jax.tree.leaves(tree))
    embedding = tree["embed"]["table_VD"].size + (tree["head"]["w_DV"].size if "head" in tree else 0)
    assert counts["embedding"] == embedding
    assert counts["non_embedding"] == counts["total"] - embedding
    assert counts["with_head"] == counts["non_embedding"] + cfg.vocab_size * cfg.d_model
    assert counts["active"] == counts["total"] - row.inactive(tree, cfg)


@per_family
def test_leaf_names_carry_their_shape_letters(row):
    for cfg in (row.micro, *row.variants):
        tree = jax.eval_shape(lambda cfg=cfg: jscale.init(jax.random.PRNGKey(0), cfg))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            letters = str(path[-1].key).rsplit("_", 1)[-1]
            assert letters.isupper() and len(letters) == leaf.ndim, (path, leaf.shape)
            stacks = {st.key: st.n_steps for st in models.family_of(cfg).spec(cfg).layer_stacks}
            if path[0].key in stacks:
                assert letters[0] == "L" and leaf.shape[0] == stacks[path[0].key], path


@per_family
def test_init_is_bitwise_stable(row):
    """Same key → the same parameters as before the shared scaffold (recorded hash)."""
    params = jscale.init(jax.random.PRNGKey(INIT_SEED), row.micro)
    assert param_hash(params) == row.init_sha256
    tree_allclose(params, jscale.init(jax.random.PRNGKey(INIT_SEED), row.micro), rtol=0, atol=0)


@pytest.mark.parametrize("name", jscale.presets.names())
def test_every_preset_builds_and_runs(name):
    cfg = jscale.presets.get(name)
    row = row_of(cfg.model)  # every preset has a row
    params = jscale.init(jax.random.PRNGKey(0), cfg.model)
    logits, aux = jax.jit(lambda p, t: jscale.apply(p, t, cfg.model))(params,
                                                                      jnp.zeros((1, 8), jnp.int32))
    assert logits.shape == (1, 8, cfg.model.vocab_size) and set(aux) == row.aux_keys
    assert np.all(np.isfinite(logits))


@per_family
def test_run_config_round_trip(row):
    for model in (row.micro, *row.variants):
        cfg = RunConfig(model=model, data=DataConfig(tokenizer="bpe"),
                        train=TrainConfig(seq_len=row.seq_len))
        d = json.loads(json.dumps(cfg.to_dict()))
        assert d["model"]["family"] == row.family
        assert RunConfig.from_dict(d) == cfg


@per_family
def test_flops_per_token_matches_xla_cost_analysis(row, monkeypatch):
    """Analytic forward FLOPs vs XLA's cost analysis of the compiled forward pass, layers unrolled
    (XLA counts a while-loop body once, not per iteration); see ``Row.flops_uncounted``."""
    if row.flops_setup is not None:
        row.flops_setup(monkeypatch)
    seq = 64
    for cfg in row.flops_cfgs:
        cfg = dataclasses.replace(cfg, scan_layers=False, **row.flops_overrides)
        analytic = jscale.flops_per_token(cfg, seq)
        np.testing.assert_allclose(forward_flops(cfg, B, seq),
                                   (analytic["forward"] - row.flops_uncounted(cfg)) * B * seq,
                                   rtol=FLOPS_VS_XLA_RTOL)
        assert analytic["training"] == 3 * analytic["forward"]


@per_family
def test_memory_and_max_seq_len(row):
    cfg = row.micro
    n = models.count_params(cfg)["total"]
    tokens = 4 * 32
    rows = tokens * getattr(cfg, "n_streams", 1)  # ParScale keeps every stream's activations
    assert models.memory_bytes(cfg, 4, 32) == 4 * (4 * n + 24 * rows * cfg.n_layers * cfg.d_model
                                                   + 2 * tokens * cfg.vocab_size)
    max_len = models.max_seq_len(cfg)
    assert max_len is None or max_len >= row.seq_len


@per_family
def test_shape_for_params_hits_target_and_keeps_the_family(row):
    for target in (1e5, 1e6):
        cfg = models.shape_for_params(target, row.micro)
        assert type(cfg) is type(row.micro)
        n = models.count_params(cfg)["non_embedding"]
        assert abs(math.log(n / target)) < math.log(1.25), (target, n)
    with pytest.raises(ConfigError, match="count must be"):
        models.shape_for_params(5e4, row.micro, count="embedding")
    with pytest.raises(ConfigError, match="n_params must be > 0"):
        models.shape_for_params(0, row.micro)
    with pytest.raises(ConfigError, match="min_layers <= max_layers"):
        models.shape_for_params(5e4, row.micro, min_layers=3, max_layers=2)


@per_family
def test_shape_for_params_equals_the_sweep_rule(row):
    """The family's rule gives exactly what ``jscale.sweep.shape_for_params`` gave."""
    from jscale import sweep
    for target, kw in [(3e4, {}), (2e5, {}), (1e6, {"count": "with_head"}),
                       (5e5, {"aspect_ratio": 32.0, "min_layers": 2}), (2e4, {"head_dim": 16}),
                       (1e5, {"max_layers": 4, "count": "total", "count_rtol": 0.05})]:
        assert models.shape_for_params(target, row.micro, **kw) == sweep.shape_for_params(
            target, row.micro, **kw), (target, kw)


@per_family
def test_family_flops_per_token_is_the_family_count(row):
    base = row.micro
    fpt = models.family_flops_per_token(base, 128, n_min=1e5, n_max=1e7, points=5)
    cfg = models.shape_for_params(1e6, base)
    n = models.count_params(cfg)["non_embedding"]
    assert fpt(np.array([n]))[0] == pytest.approx(models.flops_per_token(cfg, 128)["training"])
    # Extrapolated beyond the table with the end segments' slopes: finite and increasing.
    far = fpt(np.array([1e3, 1e4, 1e8, 1e9]))
    assert np.all(np.isfinite(far)) and np.all(np.diff(far) > 0)


# ---------------------------------------------------------------------------------------------------
# the registry (not per family)


def test_unknown_config_and_family_name_the_field():
    with pytest.raises(ConfigError, match=r"^model: dict is not the config of a registered model "
                                          r"family \(registered: \[.*'mamba'.*'transformer'"):
        registry.family_of({})
    with pytest.raises(ConfigError, match=r"^model\.family: unknown family 'nope'"):
        registry.by_name("nope")


def test_builtin_table_loads_a_family_on_a_miss(tmp_path, monkeypatch):
    """A family listed in ``registry.BUILTIN`` registers itself when a lookup first misses."""
    (tmp_path / "jscale_fake_family.py").write_text(
        "import dataclasses\nfrom jscale import registry\n\n"
        "@dataclasses.dataclass(frozen=True, kw_only=True)\nclass FakeConfig:\n    vocab_size: int = 257\n\n"
        "class Fake:\n    name = 'fake'\n    config_cls = FakeConfig\n"
        "    def max_seq_len(self, cfg):\n        return None\n"
        "    def param_groups(self, cfg):\n        return {'all': None}\n\n"
        "registry.register(Fake())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.BUILTIN, "fake", "jscale_fake_family")
    try:
        assert "jscale_fake_family" not in sys.modules
        family = registry.by_name("fake")
        cfg = RunConfig(model=family.config_cls())
        assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    finally:
        registry.unregister("fake")
        sys.modules.pop("jscale_fake_family", None)
