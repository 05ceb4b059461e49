"""Configs: typed overrides, validation messages, presets, serialization."""

import dataclasses
import json

import pytest

import jscale
from jscale.config import ConfigError, parse_overrides


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
    with pytest.raises(KeyError, match="presets: mamba-small, mamba-tiny, small, tiny"):
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
