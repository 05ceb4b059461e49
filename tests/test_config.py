"""Configs: typed overrides, validation messages, presets, serialization."""

import dataclasses
import json
from typing import Literal

import pytest

import jscale
from jscale import registry, sweep
from jscale.config import ConfigError, check, coerce, parse_overrides


@pytest.fixture
def tiny():
    return jscale.presets.get("tiny")


def test_presets_listed_and_sized(tiny):
    assert {"tiny", "small"} <= set(jscale.presets.names())
    assert 1e5 < jscale.count_params(tiny.model)["total"] < 1e6  # a few hundred thousand
    small = jscale.presets.get("small")
    assert 1e6 < jscale.count_params(small.model)["total"] < 1e7  # a few million
    assert jscale.presets.get("tiny") == tiny and jscale.presets.get("tiny") is not tiny


def test_unknown_preset_lists_names():
    with pytest.raises(KeyError, match="presets: mamba-small, mamba-tiny, moe-small, moe-tiny, "
                                       "parscale-tiny, small, tiny"):
        jscale.presets.get("huge")


def test_override_parses_strings_to_field_types(tiny):
    cfg = tiny.override(parse_overrides(["optim.lr=1e-2", "model.qk_norm=true", "train.steps=7",
                                         "optim.schedule=wsd", "model.head_dim=none",
                                         "data.path=/x.txt", "model.n_kv_heads=4"]))
    assert cfg.optim.lr == 0.01 and cfg.model.qk_norm is True and cfg.train.steps == 7
    assert cfg.optim.schedule == "wsd" and cfg.model.head_dim is None and cfg.data.path == "/x.txt"
    assert tiny.optim.lr == 3e-3  # the original is untouched (frozen values)
    assert cfg.override({"optim.lr": 5e-4}).optim.lr == 5e-4  # Python values work too


@pytest.mark.parametrize("updates, match", [
    ({"optim.lrr": "1"}, r"unknown config key 'optim.lrr'; valid keys: .*optim\.lr,"),
    ({"train.steps": "ten"}, r"train\.steps: must be an int"),
    ({"train.steps": "1.5"}, r"train\.steps: must be an int"),
    ({"model.qk_norm": "maybe"}, r"model\.qk_norm: must be a bool"),
    ({"optim.schedule": "linear"}, r"optim\.schedule: must be one of \['cosine', 'wsd', 'constant'\]"),
    ({"optim.lr": "-1"}, r"optim\.lr: must be > 0"),
    ({"train.batch_size": "0"}, r"train\.batch_size: must be > 0"),
    ({"model.n_kv_heads": "3"}, r"model\.n_heads: must be divisible by model\.n_kv_heads=3"),
    ({"train.seq_len": "4096"}, r"train\.seq_len: must be <= model\.max_seq_len=512"),
    ({"model.vocab_size": "300"}, r"model\.vocab_size: must equal the byte tokenizer's vocabulary"),
    ({"optim.b2": "1.0"}, r"optim\.b2: must be in \[0, 1\)"),
    ({"mesh.data": "0"}, r"mesh\.data: must be >= 1 or -1"),
    ({"data.val_every": "1"}, r"data\.val_every: must be >= 2"),
])
def test_bad_values_name_field_and_constraint(tiny, updates, match):
    with pytest.raises(ConfigError, match=match):
        tiny.override(updates)


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides(["optim.lr"])


def test_roundtrip_through_json(tiny):
    cfg = tiny.override({"model.qk_norm": True, "data.tokenizer": "bpe", "model.vocab_size": 512})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["model"]["family"] == "transformer"
    assert jscale.RunConfig.from_dict(d) == cfg


def test_configs_are_frozen_and_keyword_only(tiny):
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.optim.lr = 1.0
    with pytest.raises(TypeError):
        jscale.TransformerConfig(257, 64)


# ---------------------------------------------------------------------------------------------------
# Nested configs: a test-only model family with a sub-config, tuples and an optional sub-config.


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Sub:
    width: int = 4
    kind: Literal["a", "b"] = "a"

    def __post_init__(self):
        check(self.width > 0, "width", "must be > 0", self.width)  # named relative to itself


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Extra:
    depth: int = 2
    scales: tuple[float, ...] = (1.0,)
    inner: _Sub = dataclasses.field(default_factory=_Sub)

    def __post_init__(self):
        check(self.depth >= 1, "depth", "must be >= 1", self.depth)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _DummyNested:
    vocab_size: int = 257
    max_seq_len: int = 512
    sub: _Sub = dataclasses.field(default_factory=_Sub)
    widths: tuple[int, ...] = (1, 2)
    pair: tuple[int, str] = (0, "x")
    names: tuple[str, ...] | None = None
    extra: _Extra | None = None

    def __post_init__(self):
        check(self.sub.width <= 64, "model.sub.width", "must be <= 64", self.sub.width)


class _DummyNestedFamily:
    """A config-only family: all RunConfig asks of a family is its name, config, max_seq_len and
    parameter groups (what ``train.trainable`` may name)."""

    name = "dummy-nested"
    config_cls = _DummyNested

    def max_seq_len(self, cfg):
        return cfg.max_seq_len

    def param_groups(self, cfg):
        return {"all": None}


@pytest.fixture
def nested():
    registry.register(_DummyNestedFamily())
    yield jscale.RunConfig(model=_DummyNested())
    registry.unregister("dummy-nested")


def test_nested_valid_keys_list_leaves(nested):
    keys = nested.valid_keys()
    assert {"model.sub.width", "model.sub.kind", "model.widths", "model.pair", "model.extra"} <= set(keys)
    assert "model.sub" not in keys and not any(k.startswith("model.extra.") for k in keys)
    assert nested.flat()["model.sub.width"] == 4 and nested.flat()["model.extra"] is None
    with_extra = nested.override({"model.extra.depth": 3})
    assert {"model.extra.depth", "model.extra.scales", "model.extra.inner.width"} <= set(
        with_extra.valid_keys())
    assert "model.extra" not in with_extra.valid_keys()


def test_nested_override_from_strings_and_values(nested):
    cfg = nested.override(parse_overrides(["model.sub.width=8", "model.sub.kind=b", "model.widths=3,4,5",
                                           "model.pair=(7, y)", "model.names=[]", "optim.lr=1e-2"]))
    assert cfg.model.sub == _Sub(width=8, kind="b") and cfg.model.widths == (3, 4, 5)
    assert cfg.model.pair == (7, "y") and cfg.model.names == () and cfg.optim.lr == 0.01
    assert nested.model.sub.width == 4  # the original is untouched
    assert cfg.override({"model.sub.width": 2, "model.widths": [9]}).model.widths == (9,)
    assert cfg.override({"model.sub": _Sub(width=1)}).model.sub == _Sub(width=1)
    assert cfg.override({"model.sub": {"kind": "b"}}).model.sub == _Sub(kind="b")


def test_optional_subconfig_created_from_defaults_then_cleared(nested):
    cfg = nested.override({"model.extra.depth": "5", "model.extra.inner.width": "3"})
    assert cfg.model.extra == _Extra(depth=5, inner=_Sub(width=3))
    assert nested.override({"model.extra.scales": "0.5,2"}).model.extra == _Extra(scales=(0.5, 2.0))
    assert cfg.override({"model.extra": "none"}).model.extra is None
    assert cfg.override({"model.extra": None}).model.extra is None
    assert sweep.product(nested, **{"model.extra.depth": [1, 2]})[1].model.extra.depth == 2


@pytest.mark.parametrize("updates, match", [
    ({"model.sub.width": "0"}, r"^model\.sub\.width: must be > 0 \(got 0\)"),  # relative name, prefixed
    ({"model.sub.width": "100"}, r"^model\.sub\.width: must be <= 64"),  # the parent's own check
    ({"model.extra.depth": "0"}, r"^model\.extra\.depth: must be >= 1"),
    ({"model.extra.inner.width": "-1"}, r"^model\.extra\.inner\.width: must be > 0"),
    ({"model.sub.kind": "c"}, r"^model\.sub\.kind: must be one of \['a', 'b'\]"),
    ({"model.widths": "1,x"}, r"^model\.widths\[1\]: must be an int"),
    ({"model.widths": 3}, r"^model\.widths: must be a tuple"),
    ({"model.pair": "1,2,3"}, r"^model\.pair: must have 2 items"),
    ({"model.sub.wdth": "1"}, r"unknown config key 'model\.sub\.wdth'; valid keys: .*model\.sub\.width,"),
    ({"model.widths.x": "1"}, r"unknown config key 'model\.widths\.x'"),
    ({"model.extra.nope": "1"}, r"unknown config key 'model\.extra\.nope'"),
    ({"model.sub": "wide"}, r"^model\.sub: must be a _Sub or a mapping of its fields"),
    ({"model.sub": None, "model.sub.width": 2}, r"^model\.sub: set both as a whole and by its fields"),
])
def test_nested_bad_values_name_dotted_field(nested, updates, match):
    with pytest.raises(ConfigError, match=match):
        nested.override(updates)


@pytest.mark.parametrize("value, hint, expected", [
    ("1,2,3", tuple[int, ...], (1, 2, 3)),
    ("(1, 2, 3)", tuple[int, ...], (1, 2, 3)),
    ("[1, 2]", tuple[int, ...], (1, 2)),
    ("(1,)", tuple[int, ...], (1,)),
    ("[]", tuple[int, ...], ()),
    ("()", tuple[str, ...], ()),
    ("a, 'b c', \"d\"", tuple[str, ...], ("a", "b c", "d")),
    ([1, 2.0], tuple[int, ...], (1, 2)),
    (("x", "y"), tuple[str, ...], ("x", "y")),
    ("3, q", tuple[int, str], (3, "q")),
    ([3, "q"], tuple[int, str], (3, "q")),
    ("none", tuple[int, ...] | None, None),
    ("1e3,2", tuple[float, ...], (1000.0, 2.0)),
])
def test_coerce_tuples(value, hint, expected):
    assert coerce(value, hint, "k") == expected


@pytest.mark.parametrize("value, hint, match", [
    ("1,a", tuple[int, ...], r"^k\[1\]: must be an int"),
    ([1, 2], tuple[str, ...], r"^k\[0\]: must be a str"),
    ("1", tuple[int, str], r"^k: must have 2 items"),
    (5, tuple[int, ...], r"^k: must be a tuple"),
])
def test_coerce_tuple_errors_name_key(value, hint, match):
    with pytest.raises(ConfigError, match=match):
        coerce(value, hint, "k")


def test_nested_roundtrip_through_json(nested):
    cfg = nested.override({"model.sub.width": 9, "model.widths": (5, 6, 7), "model.pair": (1, "z"),
                           "model.names": ("p", "q"), "model.extra.scales": (0.25,),
                           "model.extra.inner.kind": "b"})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["model"]["family"] == "dummy-nested" and d["model"]["sub"] == {"width": 9, "kind": "a"}
    back = jscale.RunConfig.from_dict(d)
    assert back == cfg and isinstance(back.model.sub, _Sub) and isinstance(back.model.extra.inner, _Sub)
    assert back.model.widths == (5, 6, 7) and isinstance(back.model.extra.scales, tuple)
    assert jscale.RunConfig.from_dict(json.loads(json.dumps(nested.to_dict()))) == nested


@pytest.mark.parametrize("name", jscale.presets.names())
def test_every_preset_roundtrips_through_json(name):
    cfg = jscale.presets.get(name)
    assert jscale.RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["model"]["sub"].update(bogus=1), r"^model\.sub\.bogus: unknown field of _Sub"),
    (lambda d: d["model"].update(bogus=1), r"^model\.bogus: unknown field of _DummyNested"),
    (lambda d: d["optim"].update(lrr=1), r"^optim\.lrr: unknown field of OptimConfig"),
    (lambda d: d.update(extra_section={}), r"^extra_section: unknown config section"),
    (lambda d: d["model"].update(pair=[1, "a", 2]), r"^model\.pair: must have 2 items"),
    (lambda d: d["model"].update(family="nope"), r"^model\.family: unknown family 'nope'"),
])
def test_from_dict_rejects_unknown_keys(nested, edit, match):
    d = json.loads(json.dumps(nested.to_dict()))
    edit(d)
    with pytest.raises(ConfigError, match=match):
        jscale.RunConfig.from_dict(d)


def test_sweep_product_over_nested_key(nested):
    runs = sweep.product(nested, **{"model.sub.width": [1, 2]})
    assert [r.model.sub.width for r in runs] == [1, 2]
    assert runs[0] != runs[1] and sweep.run_id(runs[0]) != sweep.run_id(runs[1])
    assert sweep.run_id(runs[0]) == sweep.run_id(nested.override({"model.sub.width": 1}))
    tuples = sweep.product(nested, **{"model.widths": [(1,), (1, 2, 3)]})
    assert len({sweep.run_id(r) for r in tuples}) == 2
    invalid = sweep.product(nested, **{"model.sub.width": [0]})[0]
    assert isinstance(invalid, sweep.InvalidRun) and invalid.error.startswith("model.sub.width:")
    with pytest.raises(ConfigError, match="unknown config key 'model.sub.wdth'"):
        sweep.product(nested, **{"model.sub.wdth": [1]})
