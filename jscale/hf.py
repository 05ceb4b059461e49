"""Hugging Face–format checkpoints ↔ ``(model config, params)``: Qwen2, Llama and ParScale-Qwen2.

A checkpoint is a directory with ``config.json`` and ``*.safetensors`` (one ``model.safetensors``, or
shards listed in ``model.safetensors.index.json``), tensors in PyTorch's layout (``nn.Linear`` weights
``[out, in]``). :func:`load` reads one with ``safetensors``' numpy backend (no torch), :func:`save`
writes one, :func:`config_from_hf` / :func:`config_to_hf` map the ``config.json`` dict.

**Configs.** ``model_type`` ``"qwen2"`` and ``"llama"`` → :class:`~jscale.models.transformer.
TransformerConfig` (Qwen2: q/k/v biases, ``qkv_bias=True``; Llama: none); a config with
``parscale_n`` (``model_type`` ``"qwen2_parscale"``, the official ParScale code, or a ``qwen2``
config carrying the ParScale keys) → :class:`~jscale.models.parscale.ParScaleConfig`, **whatever
its** ``parscale_n``: ``parscale_n = 1`` is ``ParScaleConfig(n_streams=1)``, which is the base
transformer exactly (the same tree and logits) and keeps the checkpoint's ParScale settings (prefix
length, smoothing) for a later two-stage run; a ``qwen2_parscale`` config without the key has the
official default ``parscale_n = 1``. Keys a ``config.json`` omits take transformers' defaults for its
``model_type`` (:data:`HF_DEFAULTS`). What jscale cannot compute is refused with a
:class:`~jscale.config.ConfigError` naming the key: another ``model_type``, ``hidden_act`` other
than ``"silu"``, RoPE scaling, sliding-window attention, multimodal RoPE, quantization, Llama's
``attention_bias`` (it also puts a bias on ``o_proj``, which jscale's attention lacks) and
``mlp_bias``. The training-only fields (``init_scale``, ``remat``, ``attention_impl``,
``scan_layers``) are not part of a checkpoint: a loaded config has their defaults; ``dtype`` and
``param_dtype`` are float32 unless ``dtype=`` asks otherwise.

**Tensors** (``i`` a layer; leaves stacked on a leading ``L``; ``·`` flattens in row-major order):

==============================================  ========================================  ==============
HF tensor (shape)                               jscale leaf (one layer's slice)           layout
==============================================  ========================================  ==============
``model.embed_tokens.weight [V, D]``            ``embed.table_VD``                        copy
``model.layers.i.input_layernorm.weight [D]``   ``layers.attn_norm.scale_LD[i]``          copy
``….self_attn.q_proj.weight [H·K, D]``          ``layers.attn.w_q_LDHK[i]``               ``.T`` → D,H,K
``….self_attn.k_proj.weight [G·K, D]`` (``v``)  ``layers.attn.w_k_LDGK[i]``               ``.T`` → D,G,K
``….self_attn.q_proj.bias [H·K]`` (Qwen2)       ``layers.attn.b_q_LHK[i]``                → H,K
``….self_attn.k_proj.bias [G·K]`` (``v``)       ``layers.attn.b_k_LGK[i]``                → G,K
``….self_attn.o_proj.weight [D, H·K]``          ``layers.attn.w_o_LHKD[i]``               ``.T`` → H,K,D
``….post_attention_layernorm.weight [D]``       ``layers.mlp_norm.scale_LD[i]``           copy
``….mlp.gate_proj.weight [F, D]`` (``up``)      ``layers.mlp.w_gate_LDF[i]``              ``.T``
``….mlp.down_proj.weight [D, F]``               ``layers.mlp.w_down_LFD[i]``              ``.T``
``….self_attn.prefix_k [P, G, S, K]`` (``v``)   ``prefix.layers.attn.prefix_k_LPGSK[i]``  copy
``model.norm.weight [D]``                       ``final_norm.scale_D``                    copy
``lm_head.weight [V, D]`` (untied only)         ``head.w_DV``                             ``.T``
``model.aggregate_layer.0.weight [D, P·D]``     ``aggregator.w_in_DPD``                   ``.T`` → D,P,D
``model.aggregate_layer.0.bias [D]``            ``aggregator.b_in_D``                     copy
``model.aggregate_layer.2.weight [P, D]``       ``aggregator.w_out_DP``                   ``.T``
``model.aggregate_layer.2.bias [P]``            ``aggregator.b_out_P``                    copy
==============================================  ========================================  ==============

The aggregator's input is the ``P`` final-norm states interleaved h-major (the official
``rearrange("(n b) s h -> b s (h n)")``: column ``j·P + p`` is feature ``j`` of stream ``p``), so its
``P·D`` axis splits as ``(j, p)``: ``w_in_DPD[j, p] = weight[:, j·P + p]``. The loaded tree equals
``jax.eval_shape`` of :func:`jscale.models.init`'s exactly (structure, shapes, dtypes); a missing, a
mis-shaped or an unexpected tensor is an error naming it (and both shapes). The only tensors
skipped are those of :data:`IGNORED_TENSORS` (RoPE's cached inverse frequencies) and, with tied
embeddings, ``lm_head.weight`` (transformers ties it to the embedding on load, too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jscale import files, models
from jscale.config import ConfigError, check
from jscale.models.lm import DTYPES
from jscale.models.parscale import ParScaleConfig
from jscale.models.transformer import TransformerConfig

Array = jax.Array

#: The ``model_type`` values :func:`config_from_hf` maps.
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen2_parscale")

_QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
                       tie_word_embeddings=False, hidden_act="silu")
#: The value a ``config.json`` key takes when the file omits it, per ``model_type``: transformers'
#: ``Qwen2Config`` and ``LlamaConfig`` defaults and the official ``Qwen2ParScaleConfig``'s.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": _QWEN2_DEFAULTS,
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  hidden_act="silu", attention_bias=False, mlp_bias=False),
    "qwen2_parscale": dict(_QWEN2_DEFAULTS, parscale_n=1, parscale_n_tokens=48,
                           parscale_attn_smooth=0.01),
}

#: Tensors a checkpoint may hold that carry no parameter, skipped on load: RoPE's inverse
#: frequencies, which old transformers versions saved as buffers.
IGNORED_TENSORS = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
                   re.compile(r"model\.rotary_emb\.inv_freq"))

#: The auto classes of the official ParScale code (``modeling_qwen2_parscale.py`` and
#: ``configuration_qwen2_parscale.py`` beside the checkpoint, loaded with ``trust_remote_code``).
PARSCALE_AUTO_MAP = {"AutoConfig": "configuration_qwen2_parscale.Qwen2ParScaleConfig",
                     "AutoModelForCausalLM": "modeling_qwen2_parscale.Qwen2ParScaleForCausalLM"}

# Layouts: COPY (same shape), FLAT (HF flattens the leaf: ``leaf = hf.reshape(leaf shape)``), or an
# int ``s``: HF's ``[out, in]`` matrix is the leaf transposed, the leaf's axes split at ``s`` into
# (in, out): ``leaf = hf.T.reshape(leaf shape)``.
COPY, FLAT = "copy", "flat"

#: Per-layer tensors: (name under ``model.layers.{i}.``, the stacked jscale leaf, layout).
LAYER_TENSORS: tuple[tuple[str, tuple[str, ...], str | int], ...] = (
    ("input_layernorm.weight", ("layers", "attn_norm", "scale_LD"), COPY),
    ("self_attn.q_proj.weight", ("layers", "attn", "w_q_LDHK"), 1),
    ("self_attn.k_proj.weight", ("layers", "attn", "w_k_LDGK"), 1),
    ("self_attn.v_proj.weight", ("layers", "attn", "w_v_LDGK"), 1),
    ("self_attn.q_proj.bias", ("layers", "attn", "b_q_LHK"), FLAT),
    ("self_attn.k_proj.bias", ("layers", "attn", "b_k_LGK"), FLAT),
    ("self_attn.v_proj.bias", ("layers", "attn", "b_v_LGK"), FLAT),
    ("self_attn.o_proj.weight", ("layers", "attn", "w_o_LHKD"), 2),
    ("post_attention_layernorm.weight", ("layers", "mlp_norm", "scale_LD"), COPY),
    ("mlp.gate_proj.weight", ("layers", "mlp", "w_gate_LDF"), 1),
    ("mlp.up_proj.weight", ("layers", "mlp", "w_up_LDF"), 1),
    ("mlp.down_proj.weight", ("layers", "mlp", "w_down_LFD"), 1),
    ("self_attn.prefix_k", ("prefix", "layers", "attn", "prefix_k_LPGSK"), COPY),
    ("self_attn.prefix_v", ("prefix", "layers", "attn", "prefix_v_LPGSK"), COPY),
)
#: Whole-model tensors: (HF name, jscale leaf, layout).
MODEL_TENSORS: tuple[tuple[str, tuple[str, ...], str | int], ...] = (
    ("model.embed_tokens.weight", ("embed", "table_VD"), COPY),
    ("model.norm.weight", ("final_norm", "scale_D"), COPY),
    ("lm_head.weight", ("head", "w_DV"), 1),
    ("model.aggregate_layer.0.weight", ("aggregator", "w_in_DPD"), 2),
    ("model.aggregate_layer.0.bias", ("aggregator", "b_in_D"), COPY),
    ("model.aggregate_layer.2.weight", ("aggregator", "w_out_DP"), 1),
    ("model.aggregate_layer.2.bias", ("aggregator", "b_out_P"), COPY),
)

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_MAX_LISTED = 8


# ---------------------------------------------------------------------------------------------------
# config.json


def _key(name: str) -> str:
    return f"config.json {name}"


def config_from_hf(config: Mapping[str, Any], *,
                   dtype: str | None = None) -> TransformerConfig | ParScaleConfig:
    """A ``config.json`` dict → the jscale model config (see the module docstring for the rules).

    ``dtype`` (``"float32"``, ``"bfloat16"`` or ``"float16"``; ``None``: float32) sets both the
    compute ``dtype`` and the ``param_dtype``. Raises :class:`ConfigError` naming the key for a
    config jscale cannot compute."""
    model_type = config.get("model_type")
    check(model_type in SUPPORTED_MODEL_TYPES, _key("model_type"),
          f"must be one of {SUPPORTED_MODEL_TYPES}", model_type)
    dtype = "float32" if dtype is None else dtype
    check(dtype in DTYPES, "dtype", f"must be one of {DTYPES}", dtype)
    c = {**HF_DEFAULTS[model_type], **config}
    check(not c.get("quantization_config"), _key("quantization_config"),
          "quantized checkpoints are not supported", c.get("quantization_config"))
    check(c["hidden_act"] == "silu", _key("hidden_act"), "must be 'silu' (SwiGLU)", c["hidden_act"])
    scaling = c.get("rope_scaling")
    check(scaling is None or _default_rope(scaling), _key("rope_scaling"),
          "must be null (RoPE scaling is not supported)", scaling)
    rope_theta = c["rope_theta"]
    parameters = c.get("rope_parameters")  # transformers >= 5 keeps rope_theta in here
    if parameters is not None:
        check(_default_rope(parameters), _key("rope_parameters"),
              "must have rope_type 'default' (RoPE scaling is not supported)", parameters)
        rope_theta = parameters.get("rope_theta", rope_theta)
    check(not c.get("use_sliding_window", False), _key("use_sliding_window"),
          "must be false (sliding-window attention is not supported)", c.get("use_sliding_window"))
    layer_types = c.get("layer_types")
    check(layer_types is None or all(t == "full_attention" for t in layer_types),
          _key("layer_types"), "must all be 'full_attention'", layer_types)
    check(not c.get("use_mrope", False), _key("use_mrope"),
          "must be false (multimodal RoPE is not supported)", c.get("use_mrope"))
    if model_type == "llama":
        check(not c["attention_bias"], _key("attention_bias"),
              "must be false: Llama's attention_bias also puts a bias on o_proj, which jscale's "
              "attention does not have", c["attention_bias"])
        check(not c["mlp_bias"], _key("mlp_bias"), "must be false (the SwiGLU FFN has no biases)",
              c["mlp_bias"])
        check("parscale_n" not in c, _key("parscale_n"),
              "ParScale checkpoints are Qwen2-format (model_type 'qwen2_parscale' or 'qwen2'), "
              "not 'llama'", c.get("parscale_n"))
    n_heads = c["num_attention_heads"]
    n_kv = c["num_key_value_heads"]
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim * n_heads == c["hidden_size"]:
        head_dim = None
    fields = dict(vocab_size=c["vocab_size"], d_model=c["hidden_size"],
                  n_layers=c["num_hidden_layers"], n_heads=n_heads,
                  n_kv_heads=n_heads if n_kv is None else n_kv, d_ff=c["intermediate_size"],
                  head_dim=head_dim, max_seq_len=c["max_position_embeddings"],
                  rope_theta=float(rope_theta), norm_eps=float(c["rms_norm_eps"]),
                  qkv_bias=model_type != "llama", tie_embeddings=bool(c["tie_word_embeddings"]),
                  dtype=dtype, param_dtype=dtype)
    if "parscale_n" in c:
        defaults = HF_DEFAULTS["qwen2_parscale"]
        return ParScaleConfig(**fields, n_streams=c["parscale_n"],
                              n_prefix_tokens=c.get("parscale_n_tokens",
                                                    defaults["parscale_n_tokens"]),
                              smoothing=float(c.get("parscale_attn_smooth",
                                                    defaults["parscale_attn_smooth"])))
    return TransformerConfig(**fields)


def _default_rope(rope: Any) -> bool:
    """Whether a ``rope_scaling`` / ``rope_parameters`` dict asks for plain RoPE."""
    return (isinstance(rope, Mapping) and rope.get("rope_type", rope.get("type")) == "default"
            and set(rope) <= {"rope_type", "type", "rope_theta"})


def _check_savable(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the field unless ``cfg`` has a Hugging Face format."""
    check(isinstance(cfg, TransformerConfig), "model",
          "only a TransformerConfig or a ParScaleConfig has a Hugging Face format",
          type(cfg).__name__)
    check(cfg.moe is None, "model.moe", "must be None (MoE models have no Qwen2/Llama format)",
          cfg.moe)
    check(not cfg.qk_norm, "model.qk_norm",
          "must be False (Qwen2/Llama have no query/key norm)", cfg.qk_norm)
    if isinstance(cfg, ParScaleConfig):
        check(cfg.qkv_bias, "model.qkv_bias",
              "must be True for a ParScale checkpoint (the official ParScale model is Qwen2, with "
              "q/k/v biases; save model.base for a Llama-format checkpoint)", cfg.qkv_bias)


def config_to_hf(cfg: TransformerConfig | ParScaleConfig) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg``: ``model_type`` ``"qwen2"`` with ``qkv_bias``, else
    ``"llama"``; a :class:`ParScaleConfig` adds the ``parscale_*`` keys, and with ``n_streams > 1``
    is ``"qwen2_parscale"`` (the official code's ``auto_map``). ``torch_dtype`` is
    ``param_dtype``. Raises :class:`ConfigError` for a config without one (MoE, qk-norm)."""
    _check_savable(cfg)
    parscale = isinstance(cfg, ParScaleConfig)
    if parscale and cfg.n_streams > 1:
        model_type, arch = "qwen2_parscale", "Qwen2ParScaleForCausalLM"
    elif cfg.qkv_bias:
        model_type, arch = "qwen2", "Qwen2ForCausalLM"
    else:
        model_type, arch = "llama", "LlamaForCausalLM"
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.k, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rope_scaling": None, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "torch_dtype": cfg.param_dtype}
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    if parscale:
        out.update(parscale_n=cfg.n_streams, parscale_n_tokens=cfg.n_prefix_tokens,
                   parscale_attn_smooth=cfg.smoothing)
        if cfg.n_streams > 1:
            out["auto_map"] = dict(PARSCALE_AUTO_MAP)
    return out


# ---------------------------------------------------------------------------------------------------
# the tensor map


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One HF tensor: its name, the jscale leaf (path), the layer it fills (``None``: the whole
    leaf), its layout, and the jscale shape and dtype of what it fills (one layer's slice)."""

    name: str
    path: tuple[str, ...]
    layer: int | None
    layout: str | int
    shape: tuple[int, ...]
    dtype: Any

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.layout == COPY:
            return self.shape
        if self.layout == FLAT:
            return (math.prod(self.shape),)
        s = self.layout
        return (math.prod(self.shape[s:]), math.prod(self.shape[:s]))

    def to_jscale(self, x: np.ndarray) -> np.ndarray:
        if self.layout == COPY:
            return x
        if self.layout == FLAT:
            return x.reshape(self.shape)
        return x.T.reshape(self.shape)

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        if self.layout == COPY:
            return y
        if self.layout == FLAT:
            return y.reshape(-1)
        s = self.layout
        return np.ascontiguousarray(
            y.reshape(math.prod(self.shape[:s]), math.prod(self.shape[s:])).T)


def _expected_tree(cfg: Any) -> Any:
    """``jax.eval_shape`` of the model's init: the tree (of ``ShapeDtypeStruct``) a checkpoint fills."""
    return jax.eval_shape(lambda key: models.init(key, cfg), jax.random.PRNGKey(0))


def _path_keys(path: Any) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path)


def _entries(cfg: Any) -> list[_Entry]:
    """Every HF tensor of ``cfg``'s checkpoint, in the order of the jscale tree's leaves."""
    layer_rules = {path: (name, layout) for name, path, layout in LAYER_TENSORS}
    model_rules = {path: (name, layout) for name, path, layout in MODEL_TENSORS}
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(_expected_tree(cfg)):
        keys = _path_keys(path)
        if keys in layer_rules:
            name, layout = layer_rules[keys]
            out += [_Entry(f"model.layers.{i}.{name}", keys, i, layout, tuple(leaf.shape[1:]),
                           leaf.dtype) for i in range(leaf.shape[0])]
        elif keys in model_rules:
            name, layout = model_rules[keys]
            out.append(_Entry(name, keys, None, layout, tuple(leaf.shape), leaf.dtype))
        else:
            raise ConfigError(f"model: the leaf {'.'.join(keys)} has no Hugging Face tensor name "
                              f"({models.describe(cfg)})")
    return out


def _listed(items: list[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    return shown + (f"; … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------------
# load / save


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint at ``path`` (the index's, when there is one)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index}: has no 'weight_map' (a dict of tensor name -> file)")
        shards = [path / f for f in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise ConfigError(f"{index}: lists shard(s) {missing} that are not in {path}")
        return shards
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ConfigError(f"{path}: no *.safetensors file")
    return shards


def load(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Read the Hugging Face checkpoint directory ``path`` → ``(model config, params)``.

    The config is :func:`config_from_hf` of ``config.json`` (``dtype``: as there; float32 by
    default); the parameters are the tensors of every safetensors shard mapped as in the module
    docstring and cast to ``param_dtype`` (bfloat16 and float16 files read too). Every name and shape
    is checked before a tensor is read; a missing, mis-shaped, unexpected or non-float tensor raises
    :class:`ConfigError` naming it (and the expected and found shapes)."""
    from safetensors import safe_open

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise ConfigError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    cfg = config_from_hf(json.loads(config_file.read_text()), dtype=dtype)
    entries = _entries(cfg)
    with contextlib.ExitStack() as stack:
        found: dict[str, tuple[Any, list[int], str]] = {}  # name -> (open file, shape, dtype)
        for shard in _shard_files(path):
            f = stack.enter_context(safe_open(str(shard), framework="np"))
            for name in f.keys():
                if name in found:
                    raise ConfigError(f"{path}: tensor {name} is in two shards (one is {shard.name})")
                sl = f.get_slice(name)
                found[name] = (f, list(sl.get_shape()), sl.get_dtype())
        expected = {e.name for e in entries}
        ignored = {n for n in found if any(p.fullmatch(n) for p in IGNORED_TENSORS)}
        if cfg.tie_embeddings:
            ignored.add("lm_head.weight")
        problems = []
        missing = [f"{e.name} (expected {list(e.hf_shape)})" for e in entries if e.name not in found]
        if missing:
            problems.append(f"missing tensors: {_listed(missing)}")
        shaped = [f"{e.name} is {found[e.name][1]}, expected {list(e.hf_shape)}" for e in entries
                  if e.name in found and tuple(found[e.name][1]) != e.hf_shape]
        if shaped:
            problems.append(f"mis-shaped tensors: {_listed(shaped)}")
        typed = [f"{e.name} is {found[e.name][2]}" for e in entries
                 if e.name in found and found[e.name][2] not in _FLOAT_DTYPES]
        if typed:
            problems.append(f"non-float tensors (only {sorted(_FLOAT_DTYPES)} are read): "
                            f"{_listed(typed)}")
        unexpected = sorted(set(found) - expected - ignored)
        if unexpected:
            problems.append(f"unexpected tensors: {_listed(unexpected)}")
        if problems:
            raise ConfigError(f"{path}: the tensors do not match config.json's model "
                              f"({models.describe(cfg)}): " + " | ".join(problems))
        layers: dict[tuple[str, ...], list[np.ndarray]] = {}
        params: dict[str, Any] = {}
        for e in entries:
            x = e.to_jscale(found[e.name][0].get_tensor(e.name)).astype(e.dtype, copy=False)
            if e.layer is None:
                _set(params, e.path, jnp.asarray(x))
            else:
                layers.setdefault(e.path, []).append(x)
    for leaf_path, slices in layers.items():
        _set(params, leaf_path, jnp.asarray(np.stack(slices)))
    return cfg, params


def save(path: str | os.PathLike, model_cfg: TransformerConfig | ParScaleConfig,
         params: dict[str, Any]) -> None:
    """Write ``params`` of ``model_cfg``'s model as a Hugging Face checkpoint directory ``path``:
    ``config.json`` (:func:`config_to_hf`) and ``model.safetensors`` (tensors in ``param_dtype``;
    ``lm_head.weight`` only when the head is untied), each written atomically.

    Raises :class:`ConfigError` for a config with no Hugging Face format (naming the field), for
    ``params`` whose tree differs from the model's (naming the leaf and both shapes), and when
    ``path`` already holds other safetensors shards (which :func:`load` would also read)."""
    import safetensors.numpy

    hf_config = config_to_hf(model_cfg)
    entries = _entries(model_cfg)
    expected = {_path_keys(p): leaf for p, leaf in
                jax.tree_util.tree_leaves_with_path(_expected_tree(model_cfg))}
    got = {_path_keys(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"missing {'.'.join(k)}" for k in expected if k not in got]
    problems += [f"unexpected {'.'.join(k)}" for k in got if k not in expected]
    problems += [f"{'.'.join(k)} is {list(np.shape(got[k]))}, expected {list(leaf.shape)}"
                 for k, leaf in expected.items() if k in got and np.shape(got[k]) != leaf.shape]
    if problems:
        raise ConfigError(f"params: not the tree of {models.describe(model_cfg)}: "
                          f"{_listed(problems)}")
    path = Path(path)
    stale = [p.name for p in path.glob("*.safetensors") if p.name != "model.safetensors"]
    stale += [p.name for p in path.glob("*.safetensors.index.json")]
    if stale:
        raise ConfigError(f"{path}: already holds {sorted(stale)}, which load would read with "
                          "model.safetensors; save into an empty directory")
    pd = np.dtype(jnp.dtype(model_cfg.param_dtype))
    arrays = {k: np.asarray(x).astype(pd) for k, x in got.items()}
    tensors = {e.name: e.to_hf(arrays[e.path] if e.layer is None else arrays[e.path][e.layer])
               for e in entries}
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    blob = safetensors.numpy.save(tensors, metadata={"format": "pt"})
    files.atomic_write(path / "model.safetensors", lambda f: f.write(blob))
    files.atomic_write_json(path / "config.json", hf_config)
