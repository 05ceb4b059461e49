"""Hugging Face–format checkpoints (:mod:`jscale.hf`).

The checkpoints here are built in the official format — a ``config.json`` dict shaped like the
published Qwen2 / Llama / ParScale ones and random tensors under the official names and shapes,
written with ``safetensors.numpy`` — and jscale's logits on them are compared with an independent
numpy (float64) transcription of the official forward passes (transformers' Qwen2/Llama modeling and
QwenLM/ParScale's ``modeling_qwen2_parscale.py``), not with jscale's own code.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from tolerances import F32_REORDER

from jscale import hf, models
from jscale.config import ConfigError
from jscale.models import parscale
from jscale.models.moe import MoEConfig
from jscale.models.parscale import ParScaleConfig
from jscale.models.transformer import TransformerConfig

V, D, L, H, G, F = 61, 32, 2, 4, 2, 64
B, T = 2, 8
N_PREFIX = 3


# ---------------------------------------------------------------------------------------------------
# official-format checkpoints


def official_config(kind: str, *, tied: bool = False, n_streams: int = 2,
                    head_dim: int | None = None, smoothing: float = 0.05) -> dict:
    """A small ``config.json`` dict in the published format of ``kind`` (``"qwen2"``, ``"llama"``,
    ``"parscale"``)."""
    common = {"vocab_size": V, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
              "num_attention_heads": H, "num_key_value_heads": G, "hidden_act": "silu",
              "max_position_embeddings": 128, "initializer_range": 0.02,
              "tie_word_embeddings": tied, "torch_dtype": "float32", "use_cache": True,
              "transformers_version": "4.51.3", "bos_token_id": 1, "eos_token_id": 2,
              "attention_dropout": 0.0}
    if kind == "llama":
        return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
                "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
                "head_dim": head_dim if head_dim is not None else D // H}
    qwen2 = {**common, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
             "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}
    if kind == "qwen2":
        return {**qwen2, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    assert kind == "parscale"
    return {**qwen2, "architectures": ["Qwen2ParScaleForCausalLM"], "model_type": "qwen2_parscale",
            "auto_map": dict(hf.PARSCALE_AUTO_MAP), "parscale_n": n_streams,
            "parscale_n_tokens": N_PREFIX, "parscale_attn_smooth": smoothing}


def official_tensors(c: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors under the official names and shapes for config ``c`` (float32)."""
    rng = np.random.default_rng(seed)
    n_heads, n_kv, d = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    k = c.get("head_dim") or d // n_heads
    f, v = c["intermediate_size"], c["vocab_size"]
    P = c.get("parscale_n", 1)
    bias = c["model_type"] != "llama"

    def w(out, inp, scale=1.0):
        return (scale * rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)

    def vec(n, mean=0.0, scale=0.5):
        return (mean + scale * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": (0.02 * rng.standard_normal((v, d))).astype(np.float32)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = vec(d, 1.0, 0.2)
        t[p + "self_attn.q_proj.weight"] = w(n_heads * k, d)
        t[p + "self_attn.k_proj.weight"] = w(n_kv * k, d)
        t[p + "self_attn.v_proj.weight"] = w(n_kv * k, d)
        if bias:
            t[p + "self_attn.q_proj.bias"] = vec(n_heads * k)
            t[p + "self_attn.k_proj.bias"] = vec(n_kv * k)
            t[p + "self_attn.v_proj.bias"] = vec(n_kv * k)
        t[p + "self_attn.o_proj.weight"] = w(d, n_heads * k)
        if P > 1:
            shape = (P, n_kv, c["parscale_n_tokens"], k)
            t[p + "self_attn.prefix_k"] = rng.standard_normal(shape).astype(np.float32)
            t[p + "self_attn.prefix_v"] = rng.standard_normal(shape).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = vec(d, 1.0, 0.2)
        t[p + "mlp.gate_proj.weight"] = w(f, d)
        t[p + "mlp.up_proj.weight"] = w(f, d)
        t[p + "mlp.down_proj.weight"] = w(d, f)
    t["model.norm.weight"] = vec(d, 1.0, 0.2)
    if P > 1:
        t["model.aggregate_layer.0.weight"] = w(d, P * d)
        t["model.aggregate_layer.0.bias"] = vec(d)
        t["model.aggregate_layer.2.weight"] = w(P, d, scale=3.0)  # far from an even mix
        t["model.aggregate_layer.2.bias"] = vec(P)
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = w(v, d)
    return t


def write_checkpoint(path, c: dict, tensors: dict[str, np.ndarray], *, shards: int = 1):
    """``config.json`` and the tensors (``shards`` files with an index when more than one)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(c, indent=2))
    if shards == 1:
        safetensors.numpy.save_file(tensors, str(path / "model.safetensors"),
                                    metadata={"format": "pt"})
        return path
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        safetensors.numpy.save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
         "weight_map": weight_map}))
    return path


# ---------------------------------------------------------------------------------------------------
# the official forward, in numpy


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def reference_logits(c: dict, t: dict[str, np.ndarray], tokens: np.ndarray, *,
                     aggregator_input: str = "interleaved") -> np.ndarray:
    """The official forward of config ``c`` with tensors ``t`` on ``tokens`` (float64 numpy).

    Qwen2/Llama: RMSNorm ``w * x / sqrt(mean(x²) + eps)``, q/k/v projections (+ biases for Qwen2),
    RoPE ``x·cos + rotate_half(x)·sin`` with ``inv_freq = theta^(-2i/K)``, GQA by ``repeat_kv``,
    causal softmax attention, ``o_proj``, SwiGLU ``down(silu(gate(x)) * up(x))``, final norm, head.
    ParScale (``parscale_n = P > 1``): embeddings replicated ``(n b)``; each layer's
    ``prefix_k/prefix_v`` (``n ... -> (n b) ...``) prepended to the keys/values, no RoPE on them,
    every query sees them all; after the final norm ``rearrange("(n b) s h -> b s (h n)")`` →
    Linear → SiLU → Linear → softmax → ``attn·(1−ε) + ε/P`` → weighted sum of the streams → head.
    ``aggregator_input="concatenated"`` instead feeds the streams as ``[H_0 | H_1 | …]`` (a wrong
    reading of the first Linear's input axis, for the layout test)."""
    f = {n: x.astype(np.float64) for n, x in t.items()}
    n_heads, n_kv, d = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    k = c.get("head_dim") or d // n_heads
    eps, theta = c["rms_norm_eps"], c["rope_theta"]
    P = c.get("parscale_n", 1)
    bias = c["model_type"] != "llama"
    b, s = tokens.shape

    def rms(x, w):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

    def linear(x, name, with_bias=False):
        y = x @ f[name + ".weight"].T
        return y + f[name + ".bias"] if with_bias else y

    inv_freq = 1.0 / theta ** (np.arange(0, k, 2) / k)
    freqs = np.arange(s)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)

    def rotate_half(x):
        return np.concatenate([-x[..., k // 2:], x[..., :k // 2]], axis=-1)

    def rope(x):  # [batch, heads, s, k]
        return x * cos + rotate_half(x) * sin

    x = f["model.embed_tokens.weight"][tokens]
    if P > 1:
        x = np.concatenate([x] * P, axis=0)  # "b s h -> (n b) s h": row n·b + i
    rows = x.shape[0]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, f[p + "input_layernorm.weight"])
        q = linear(h, p + "self_attn.q_proj", bias).reshape(rows, s, n_heads, k).transpose(0, 2, 1, 3)
        kk = linear(h, p + "self_attn.k_proj", bias).reshape(rows, s, n_kv, k).transpose(0, 2, 1, 3)
        vv = linear(h, p + "self_attn.v_proj", bias).reshape(rows, s, n_kv, k).transpose(0, 2, 1, 3)
        q, kk = rope(q), rope(kk)
        n_prefix = 0
        if P > 1:  # ParscaleCache: the prefix repeated "(n_parscale b)", then the new keys appended
            pk = np.repeat(f[p + "self_attn.prefix_k"], b, axis=0)
            pv = np.repeat(f[p + "self_attn.prefix_v"], b, axis=0)
            kk, vv = np.concatenate([pk, kk], axis=2), np.concatenate([pv, vv], axis=2)
            n_prefix = pk.shape[2]
        rep = n_heads // n_kv  # repeat_kv: query head j reads kv head j // rep
        kk = kk[:, :, None].repeat(rep, axis=2).reshape(rows, n_heads, -1, k)
        vv = vv[:, :, None].repeat(rep, axis=2).reshape(rows, n_heads, -1, k)
        scores = q @ kk.transpose(0, 1, 3, 2) / math.sqrt(k)
        seen = np.concatenate([np.ones((s, n_prefix), bool), np.tril(np.ones((s, s), bool))], 1)
        probs = _softmax(np.where(seen, scores, -np.inf))
        o = (probs @ vv).transpose(0, 2, 1, 3).reshape(rows, s, n_heads * k)
        x = x + linear(o, p + "self_attn.o_proj")
        h = rms(x, f[p + "post_attention_layernorm.weight"])
        x = x + linear(_silu(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"),
                       p + "mlp.down_proj")
    x = rms(x, f["model.norm.weight"])
    if P > 1:
        streams = x.reshape(P, b, s, d)  # "(n b) s h": stream n is rows n·b … n·b + b − 1
        if aggregator_input == "interleaved":  # "b s (h n)": column j·P + n is feature j of n
            u = streams.transpose(1, 2, 3, 0).reshape(b, s, d * P)
        else:  # "b s (n h)": [H_0 | H_1 | …]
            u = streams.transpose(1, 2, 0, 3).reshape(b, s, P * d)
        z = _silu(linear(u, "model.aggregate_layer.0", True))
        attn = _softmax(linear(z, "model.aggregate_layer.2", True))
        eps_agg = c["parscale_attn_smooth"]
        attn = attn * (1 - eps_agg) + eps_agg / P
        x = np.sum(streams.transpose(1, 2, 0, 3) * attn[..., None], axis=2)
    head = f["model.embed_tokens.weight"] if c["tie_word_embeddings"] else f["lm_head.weight"]
    return x @ head.T


def _tokens(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (B, T))


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens_BT):
    return models.forward(params, tokens_BT, cfg)[0]


def _jscale_logits(cfg, params, tokens) -> np.ndarray:
    """jscale's logits (``models.forward``; float32)."""
    return np.asarray(_forward(cfg, params, jnp.asarray(tokens)))


# ---------------------------------------------------------------------------------------------------
# 1. logits against the official forward

CASES = {  # id -> official_config kwargs
    "qwen2-untied": dict(kind="qwen2"),
    "qwen2-tied": dict(kind="qwen2", tied=True),
    "llama-untied-head_dim16": dict(kind="llama", head_dim=16),
    "llama-tied": dict(kind="llama", tied=True),
    "parscale-P2-tied": dict(kind="parscale", n_streams=2, tied=True),
    "parscale-P4-untied": dict(kind="parscale", n_streams=4),
    "parscale-P1": dict(kind="parscale", n_streams=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_the_official_forward(tmp_path, case):
    c = official_config(**CASES[case])
    t = official_tensors(c)
    cfg, params = hf.load(write_checkpoint(tmp_path, c, t))
    want_type = ParScaleConfig if c.get("parscale_n") else TransformerConfig
    assert type(cfg) is want_type
    if want_type is ParScaleConfig:
        assert (cfg.n_streams, cfg.n_prefix_tokens, cfg.smoothing) == (
            c["parscale_n"], N_PREFIX, c["parscale_attn_smooth"])
    assert cfg.qkv_bias == (c["model_type"] != "llama")
    assert cfg.k == (c.get("head_dim") or D // H)
    assert cfg.tie_embeddings == c["tie_word_embeddings"]
    assert (cfg.rope_theta, cfg.norm_eps) == (c["rope_theta"], c["rms_norm_eps"])
    like = jax.eval_shape(lambda key: models.init(key, cfg), jax.random.PRNGKey(0))
    assert jax.tree.structure(params) == jax.tree.structure(like)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(like), strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
    tokens = _tokens()
    want = reference_logits(c, t, tokens)
    np.testing.assert_allclose(_jscale_logits(cfg, params, tokens), want, **F32_REORDER)


def test_parscale_p1_is_the_qwen2_model(tmp_path):
    """A ``parscale_n = 1`` checkpoint is a ParScaleConfig with one stream and the Qwen2 tree."""
    c = official_config("parscale", n_streams=1)
    t = official_tensors(c)
    cfg, params = hf.load(write_checkpoint(tmp_path / "p1", c, t))
    base_cfg, base_params = hf.load(write_checkpoint(tmp_path / "qwen2", official_config("qwen2"), t))
    assert isinstance(cfg, ParScaleConfig) and cfg.n_streams == 1 and cfg.base == base_cfg
    jax.tree.map(np.testing.assert_array_equal, params, base_params)


# ---------------------------------------------------------------------------------------------------
# 2. the aggregator's input is interleaved h-major


@pytest.mark.parametrize("n_streams", [2, 4])
def test_aggregator_input_is_interleaved_not_concatenated(tmp_path, n_streams):
    c = official_config("parscale", n_streams=n_streams)
    t = official_tensors(c, seed=3)
    cfg, params = hf.load(write_checkpoint(tmp_path, c, t))
    tokens = _tokens(4)
    official = reference_logits(c, t, tokens)
    concatenated = reference_logits(c, t, tokens, aggregator_input="concatenated")
    ours = _jscale_logits(cfg, params, tokens)
    np.testing.assert_allclose(ours, official, **F32_REORDER)
    # the wrong reading is far outside the tolerance: the test can tell the two apart
    assert np.max(np.abs(concatenated - official)) > 100 * F32_REORDER["atol"]
    # and the mapping itself: column j·P + p of the official weight is w_in_DPD[j, p]
    w = t["model.aggregate_layer.0.weight"]
    w_in = np.asarray(params["aggregator"]["w_in_DPD"])
    for j, p in [(0, 1), (5, n_streams - 1), (D - 1, 0)]:
        np.testing.assert_array_equal(w_in[j, p], w[:, j * n_streams + p])


# ---------------------------------------------------------------------------------------------------
# 3. round trips


def _small(cls=TransformerConfig, **kw):
    base = dict(vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=G, d_ff=F,
                max_seq_len=128, rope_theta=1e6, norm_eps=1e-6)
    return cls(**{**base, **kw})


ROUND_TRIP = {
    "qwen2-untied": _small(qkv_bias=True, tie_embeddings=False),
    "llama-tied": _small(qkv_bias=False, tie_embeddings=True),
    "llama-untied-head_dim16": _small(qkv_bias=False, tie_embeddings=False, head_dim=16),
    "parscale-P2": _small(ParScaleConfig, qkv_bias=True, tie_embeddings=True, n_streams=2,
                          n_prefix_tokens=N_PREFIX, smoothing=0.02),
    "parscale-P1": _small(ParScaleConfig, qkv_bias=True, tie_embeddings=False, n_streams=1),
}


def _random_params(cfg, seed=0):
    """Noise in every leaf of the model's tree (so zero biases and unit norms are not all that is
    tested; numpy draws on ``eval_shape``'s tree: no init to compile)."""
    rng = np.random.default_rng(seed)
    like = jax.eval_shape(lambda key: models.init(key, cfg), jax.random.PRNGKey(0))
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), like)


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_save_then_load_is_identity(tmp_path, case):
    cfg = ROUND_TRIP[case]
    params = _random_params(cfg)
    hf.save(tmp_path, cfg, params)
    got_cfg, got = hf.load(tmp_path)
    assert got_cfg == cfg
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == ("qwen2_parscale" if getattr(cfg, "n_streams", 1) > 1
                                     else "qwen2" if cfg.qkv_bias else "llama")
    assert ("lm_head.weight" in safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
            ) == (not cfg.tie_embeddings)


@pytest.mark.parametrize("case", ["qwen2-untied", "qwen2-tied", "llama-untied-head_dim16",
                                  "parscale-P2-tied", "parscale-P4-untied"])
def test_official_files_survive_load_then_save(tmp_path, case):
    c = official_config(**CASES[case])
    t = official_tensors(c)
    cfg, params = hf.load(write_checkpoint(tmp_path / "official", c, t))
    hf.save(tmp_path / "saved", cfg, params)
    written = safetensors.numpy.load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert sorted(written) == sorted(t)
    for name, x in t.items():
        assert written[name].dtype == x.dtype, name
        np.testing.assert_array_equal(written[name], x, err_msg=name)
    saved_cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert hf.config_from_hf(saved_cfg) == cfg
    for key in ("model_type", "hidden_size", "intermediate_size", "num_key_value_heads",
                "rope_theta", "rms_norm_eps", "tie_word_embeddings", "parscale_n",
                "parscale_n_tokens", "parscale_attn_smooth", "architectures", "auto_map"):
        assert saved_cfg.get(key) == c.get(key), key


def test_bfloat16_checkpoint(tmp_path):
    """bf16 files read as ml_dtypes bfloat16: loaded as float32 (exactly) by default, as bfloat16
    with ``dtype=``, and written back bit for bit."""
    c = {**official_config("qwen2"), "torch_dtype": "bfloat16"}
    t32 = official_tensors(c)
    t16 = {n: x.astype(ml_dtypes.bfloat16) for n, x in t32.items()}
    path = write_checkpoint(tmp_path / "bf16", c, t16)
    read = safetensors.numpy.load_file(str(path / "model.safetensors"))
    assert read["model.norm.weight"].dtype == np.dtype(ml_dtypes.bfloat16)

    cfg32, p32 = hf.load(path)
    assert (cfg32.dtype, cfg32.param_dtype) == ("float32", "float32")
    assert p32["layers"]["attn"]["w_q_LDHK"].dtype == jnp.float32
    tokens = _tokens()
    ref = reference_logits(c, {n: x.astype(np.float32) for n, x in t16.items()}, tokens)
    np.testing.assert_allclose(_jscale_logits(cfg32, p32, tokens), ref, **F32_REORDER)

    cfg16, p16 = hf.load(path, dtype="bfloat16")
    assert (cfg16.dtype, cfg16.param_dtype) == ("bfloat16", "bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), p16, p32)
    hf.save(tmp_path / "saved", cfg16, p16)
    written = safetensors.numpy.load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, x in t16.items():
        assert written[name].dtype == x.dtype
        np.testing.assert_array_equal(written[name].view(np.uint16), x.view(np.uint16))


def test_sharded_checkpoint_and_ignored_buffers(tmp_path):
    """Shards listed in ``model.safetensors.index.json`` load like one file; RoPE's saved
    ``inv_freq`` buffers (old transformers) are skipped."""
    c = official_config("parscale", n_streams=2)
    t = official_tensors(c)
    one_cfg, one = hf.load(write_checkpoint(tmp_path / "one", c, t))
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)
             for i in range(L)}
    cfg, params = hf.load(write_checkpoint(tmp_path / "sharded", c, {**t, **extra}, shards=3))
    assert cfg == one_cfg
    jax.tree.map(np.testing.assert_array_equal, params, one)


# ---------------------------------------------------------------------------------------------------
# 4. published configs → parameter counts

#: Qwen/Qwen2.5-3B's config.json (its model card: 3.09 B parameters, 2.77 B non-embedding).
QWEN25_3B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 32768, "max_window_layers": 36,
    "model_type": "qwen2", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False,
    "use_sliding_window": False, "vocab_size": 151936}

#: The paper's 4.4 B ParScale model at P = 2 (QwenLM/ParScale README: ``cost_analysis.py
#: --hidden_size 2560 --intermediate_size 13824 --P 2``, 36 layers, 16 heads, 2 kv heads, vocab
#: 151936, 48 prefix tokens), in the official config format.
PARSCALE_4P4B_P2 = {
    "architectures": ["Qwen2ParScaleForCausalLM"], "auto_map": dict(hf.PARSCALE_AUTO_MAP),
    "model_type": "qwen2_parscale", "hidden_act": "silu", "hidden_size": 2560,
    "intermediate_size": 13824, "num_hidden_layers": 36, "num_attention_heads": 16,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "use_sliding_window": False, "sliding_window": None, "rope_scaling": None,
    "parscale_n": 2, "parscale_n_tokens": 48, "parscale_attn_smooth": 0.01,
    "torch_dtype": "bfloat16"}


def _dense_non_embedding(d, n_layers, n_heads, n_kv, k, f):
    """Qwen2 blocks by hand: q, o; k, v; q/k/v biases; SwiGLU; two norms per layer; final norm."""
    per_layer = 2 * d * n_heads * k + 2 * d * n_kv * k + (n_heads + 2 * n_kv) * k + 3 * d * f + 2 * d
    return n_layers * per_layer + d


def test_qwen25_3b_config_and_counts():
    cfg = hf.config_from_hf(QWEN25_3B)
    assert cfg == TransformerConfig(
        vocab_size=151936, d_model=2048, n_layers=36, n_heads=16, n_kv_heads=2, d_ff=11008,
        head_dim=None, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
        tie_embeddings=True)
    counts = models.count_params(cfg)
    assert counts["non_embedding"] == _dense_non_embedding(2048, 36, 16, 2, 128, 11008)
    assert counts["embedding"] == 151936 * 2048
    assert round(counts["total"] / 1e9, 2) == 3.09 and round(counts["non_embedding"] / 1e9, 2) == 2.77


def test_parscale_4p4b_config_and_counts():
    cfg = hf.config_from_hf(PARSCALE_4P4B_P2)
    assert isinstance(cfg, ParScaleConfig)
    assert (cfg.n_streams, cfg.n_prefix_tokens, cfg.smoothing) == (2, 48, 0.01)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.k, cfg.d_ff) == (
        2560, 36, 16, 2, 160, 13824)
    assert parscale.count_new(cfg) == {"prefix": 2_211_840, "aggregator": 13_114_882}
    base = _dense_non_embedding(2560, 36, 16, 2, 160, 13824)
    assert round(base / 1e9, 1) == 4.4  # the paper's "4.4B": non-embedding parameters
    counts = models.count_params(cfg)
    assert counts["non_embedding"] == base + 2_211_840 + 13_114_882
    assert counts["embedding"] == 151936 * 2560
    assert models.count_params(cfg.base)["non_embedding"] == base


def test_config_defaults_and_head_dim():
    """Keys a config.json omits take transformers' defaults; an explicit head_dim is kept only when
    it differs from hidden / heads; Llama's num_key_value_heads None is multi-head attention."""
    cfg = hf.config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                             "num_key_value_heads": None, "head_dim": 16, "num_hidden_layers": 1})
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.max_seq_len, cfg.qkv_bias,
            cfg.tie_embeddings) == (4, None, 32000, 2048, False, False)
    cfg = hf.config_from_hf({**official_config("qwen2"), "head_dim": 16})
    assert cfg.head_dim == 16 and cfg.k == 16
    cfg = hf.config_from_hf({**official_config("qwen2"), "parscale_n": 2})
    assert isinstance(cfg, ParScaleConfig) and (cfg.n_streams, cfg.n_prefix_tokens) == (2, 48)
    cfg = hf.config_from_hf({**official_config("qwen2"), "rope_scaling": {"rope_type": "default"}})
    assert cfg.rope_theta == 1e6


# ---------------------------------------------------------------------------------------------------
# 5. bad input

BAD_CONFIGS = {  # id -> (kind, changes, text the error must contain)
    "model_type": ("qwen2", {"model_type": "mistral"}, "model_type"),
    "rope_scaling": ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                     "rope_scaling"),
    "rope_parameters": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
                        "rope_parameters"),
    "hidden_act": ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    "sliding_window": ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    "quantization": ("qwen2", {"quantization_config": {"quant_method": "gptq", "bits": 4}},
                     "quantization_config"),
    "attention_bias": ("llama", {"attention_bias": True}, "attention_bias"),
    "mlp_bias": ("llama", {"mlp_bias": True}, "mlp_bias"),
    "llama_parscale": ("llama", {"parscale_n": 2}, "parscale_n"),
    "layer_types": ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]},
                    "layer_types"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_unsupported_configs_are_refused_naming_the_key(case):
    kind, changes, text = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=text) as err:
        hf.config_from_hf({**official_config(kind), **changes})
    if case == "model_type":
        assert all(m in str(err.value) for m in hf.SUPPORTED_MODEL_TYPES)
    if case == "attention_bias":
        assert "o_proj" in str(err.value)


def _break(t, case):
    t = dict(t)
    if case == "missing":
        del t["model.layers.1.self_attn.k_proj.bias"]
        return t, ["model.layers.1.self_attn.k_proj.bias", "[16]"]
    if case == "mis-shaped":
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].T.copy()
        return t, ["model.layers.0.mlp.up_proj.weight", "[32, 64]", "[64, 32]"]
    if case == "unexpected":
        t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(D, np.float32)
        return t, ["unexpected", "model.layers.0.self_attn.o_proj.bias"]
    if case == "prefix-length":  # parscale_n_tokens says 3, the prefixes hold 5
        for i in range(L):
            for kv in ("k", "v"):
                t[f"model.layers.{i}.self_attn.prefix_{kv}"] = np.zeros((2, G, 5, D // H), np.float32)
        return t, ["model.layers.0.self_attn.prefix_k", "[2, 2, 5, 8]", "[2, 2, 3, 8]"]
    t["model.norm.weight"] = np.arange(D, dtype=np.int32)
    return t, ["model.norm.weight", "I32"]


@pytest.mark.parametrize("case", ["missing", "mis-shaped", "unexpected", "prefix-length",
                                  "integer"])
def test_tensor_mismatches_are_refused_naming_the_tensor(tmp_path, case):
    c = official_config("parscale" if case == "prefix-length" else "qwen2")
    t, texts = _break(official_tensors(c), case)
    with pytest.raises(ConfigError) as err:
        hf.load(write_checkpoint(tmp_path, c, t))
    for text in texts:
        assert text in str(err.value), (text, str(err.value))


def test_unsavable_models_are_refused_naming_the_field(tmp_path):
    for cfg, field in [(_small(qk_norm=True), "model.qk_norm"),
                       (_small(moe=MoEConfig(n_experts=4)), "model.moe"),
                       (_small(ParScaleConfig, n_streams=2, qkv_bias=False), "model.qkv_bias")]:
        with pytest.raises(ConfigError, match=field):
            hf.save(tmp_path / "x", cfg, {})
    cfg = _small(qkv_bias=True)
    params = models.init(jax.random.PRNGKey(0), cfg)
    params["layers"]["mlp"]["w_up_LDF"] = params["layers"]["mlp"]["w_up_LDF"][:, :, :8]
    with pytest.raises(ConfigError, match=r"layers\.mlp\.w_up_LDF is \[2, 32, 8\], expected "
                                          r"\[2, 32, 64\]"):
        hf.save(tmp_path / "y", cfg, params)
    with pytest.raises(ConfigError, match="no config.json"):
        hf.load(tmp_path / "nothing-here")
