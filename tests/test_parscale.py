"""ParScale (jscale.models.parscale): P = 1 ≡ the base, the official aggregation (h-major
interleave, smoothed weights), equal prefixes ≡ one stream, the paper's parameter accounting,
sharded ≡ unsharded, two-stage training (``--init-from``, ``train.trainable=parscale``), CLI
training, bitwise resume from a checkpoint and bad input. The shared invariants (causality,
document isolation, count ≡ tree, FLOPs vs XLA, scan ≡ loop, stable init) run on the family-table
row in tests/test_families.py."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import PARSCALE_MICRO, TRANSFORMER_MICRO, tree_allclose
from helpers import metrics_rows, micro_cfg, train_args
from tolerances import F32_GRAD, F32_REORDER, SHARDED_VS_SINGLE_LOSS

import jscale
from jscale import models, sharding
from jscale.cli import main as cli_main
from jscale.config import ConfigError
from jscale.core import loss_fn, make_layout
from jscale.models import parscale
from jscale.models.parscale import ParScaleConfig
from jscale.train import init_params_from, load_state

B, T = 2, 9


@pytest.fixture(scope="module")
def tokens_BT():
    return jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, PARSCALE_MICRO.vocab_size)


def _logits(params, tokens, cfg):
    return jax.jit(lambda p, t: models.forward(p, t, cfg)[0])(params, tokens)


def test_one_stream_is_the_base_model_exactly(tokens_BT):
    cfg = dataclasses.replace(PARSCALE_MICRO, n_streams=1)
    base = TRANSFORMER_MICRO
    assert cfg.base == base
    p, p_base = (models.init(jax.random.PRNGKey(0), c) for c in (cfg, base))
    jax.tree.map(np.testing.assert_array_equal, p, p_base)  # same tree, same values
    np.testing.assert_array_equal(_logits(p, tokens_BT, cfg), _logits(p_base, tokens_BT, base))
    batch = {"inputs": tokens_BT[:, :-1], "targets": tokens_BT[:, 1:]}
    g, g_base = (jax.jit(jax.grad(lambda q, c=c: loss_fn(q, batch, c)[0]))(p)
                 for c in (cfg, base))
    jax.tree.map(np.testing.assert_array_equal, g, g_base)
    assert models.count_params(cfg) == models.count_params(base)
    assert models.flops_per_token(cfg, 64) == models.flops_per_token(base, 64)


def test_streams_share_the_backbone_init():
    """A ParScale model and its dense base made with one key share every base leaf."""
    p = models.init(jax.random.PRNGKey(3), PARSCALE_MICRO)
    p_base = models.init(jax.random.PRNGKey(3), TRANSFORMER_MICRO)
    jax.tree.map(np.testing.assert_array_equal, {k: p[k] for k in p_base}, p_base)
    assert set(p) - set(p_base) == {"prefix", "aggregator"}
    np.testing.assert_array_equal(p["aggregator"]["w_out_DP"], 0.0)  # starts as the streams' mean


def _numpy_aggregate(h_PBTD, a, eps, *, layout):
    """The official aggregation in numpy: the input is ``rearrange("(n b) s h -> b s (h n)")`` —
    feature j of stream p at column j·P + p (``layout="h_major"``) — or, wrongly, the streams
    concatenated ``[H_0 | H_1 | …]`` (``layout="concat"``), against the same torch-shaped weight."""
    P, Bn, Tn, D = h_PBTD.shape
    w_in = a["w_in_DPD"].reshape(D * P, D)  # the official Linear's weight.T, columns j·P + p
    if layout == "h_major":
        x = h_PBTD.transpose(1, 2, 3, 0).reshape(Bn, Tn, D * P)
    else:
        x = h_PBTD.transpose(1, 2, 0, 3).reshape(Bn, Tn, P * D)
    z = x @ w_in + a["b_in_D"]
    z = z / (1 + np.exp(-z))
    logits = z @ a["w_out_DP"] + a["b_out_P"]
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True) * (1 - eps) + eps / P
    return np.einsum("pbtd,btp->btd", h_PBTD, w), w


def test_aggregation_is_the_official_h_major_interleave_and_weights_are_bounded():
    P, D, eps = 3, 8, 0.1
    ks = jax.random.split(jax.random.PRNGKey(5), 4)
    a = {"w_in_DPD": 3 * jax.random.normal(ks[0], (D, P, D)),
         "b_in_D": jax.random.normal(ks[1], (D,)),
         "w_out_DP": 3 * jax.random.normal(ks[2], (D, P)), "b_out_P": jnp.arange(P, dtype=float)}
    h = jax.random.normal(ks[3], (P, 2, 5, D))
    got, w = jax.jit(parscale.aggregate, static_argnums=2)({"aggregator": a}, h, eps)
    an = jax.tree.map(np.asarray, a)
    want, w_want = _numpy_aggregate(np.asarray(h), an, eps, layout="h_major")
    np.testing.assert_allclose(got, want, **F32_REORDER)
    np.testing.assert_allclose(w, w_want, **F32_REORDER)
    concat, _ = _numpy_aggregate(np.asarray(h), an, eps, layout="concat")
    assert np.abs(concat - want).max() > 1e-2  # the stream-concatenated reading is another model
    w = np.asarray(w)
    assert np.all(w >= eps / P - 1e-7) and np.all(w <= 1 - eps + eps / P + 1e-7)
    np.testing.assert_allclose(w.sum(-1), 1.0, **F32_REORDER)


def test_equal_prefixes_in_every_stream_give_the_single_stream_output(tokens_BT):
    """Identical streams aggregate to themselves (the weights sum to 1): the model is then the base
    transformer with one (per-row) prefix, whatever the aggregator does."""
    cfg = PARSCALE_MICRO
    p = models.init(jax.random.PRNGKey(0), cfg)
    p["aggregator"] = jax.tree.map(lambda x: x + 0.3, p["aggregator"])  # non-uniform weights
    one = jax.tree.map(lambda x: jnp.broadcast_to(x[:, :1], x.shape), p["prefix"])
    p["prefix"] = one
    got = _logits(p, tokens_BT, cfg)
    base = cfg.base
    attn = one["layers"]["attn"]
    rows = {k.replace("LPGSK", "LBSGK"): jnp.repeat(v[:, :1].transpose(0, 1, 3, 2, 4), B, axis=1)
            for k, v in attn.items()}
    family = models.family_of(base)
    h, _, _ = family.hidden(p, family.embed(p, tokens_BT, base), base, layer_inputs={"attn": rows})
    np.testing.assert_allclose(got, family.head(p, h, base), **F32_REORDER)


def test_streams_differ_and_every_stream_sees_its_own_prefix(tokens_BT):
    cfg = PARSCALE_MICRO
    p = models.init(jax.random.PRNGKey(0), cfg)

    def loss(prefix):
        return models.forward({**p, "prefix": prefix}, tokens_BT, cfg)[0][:, 0].sum()
    g = jax.jit(jax.grad(loss))(p["prefix"])["layers"]["attn"]["prefix_k_LPGSK"]
    # The first token of every stream attends to its stream's prefix in every layer.
    assert np.all(np.abs(np.asarray(g)).sum((2, 3, 4)) > 0)


def test_paper_accounting_of_the_4p4b_model():
    """ParScale's 4.4B configuration (hidden 2560, 36 layers, 2 kv heads of 160, 48 prefix tokens):
    P = 2 adds 2,211,840 prefix and 13,114,882 aggregator parameters."""
    cfg = ParScaleConfig(vocab_size=151936, d_model=2560, n_layers=36, n_heads=16, n_kv_heads=2,
                         head_dim=160, d_ff=9728, n_streams=2, n_prefix_tokens=48, qkv_bias=True)
    assert parscale.count_new(cfg) == {"prefix": 2_211_840, "aggregator": 13_114_882}
    counts, base = models.count_params(cfg), models.count_params(cfg.base)
    assert counts["non_embedding"] - base["non_embedding"] == 2_211_840 + 13_114_882
    assert counts["embedding"] == base["embedding"]
    # FLOPs: P × the stack, the prefix attention, the aggregator, the head once.
    f, fb = models.flops_per_token(cfg, 4096)["forward"], models.flops_per_token(cfg.base, 4096)
    head = 2 * 2560 * 151936
    prefix = 36 * 4 * 48 * 16 * 160
    assert f == 2 * (fb["forward"] - head + prefix) + 2 * (2 * 2560 * 2560 + 2560 * 2) + head


@pytest.mark.parametrize("updates, match", [
    ({"model.n_streams": 0}, "model.n_streams"),
    ({"model.n_prefix_tokens": -1}, "model.n_prefix_tokens"),
    ({"model.smoothing": 1.0}, "model.smoothing"),
    ({"model.smoothing": -0.1}, "model.smoothing"),
    ({"train.trainable": "experts"}, "train.trainable"),
])
def test_bad_input_names_the_field(updates, match):
    with pytest.raises(ConfigError, match=match):
        jscale.presets.get("parscale-tiny").override(updates)


def test_trainable_parscale_needs_streams():
    with pytest.raises(ConfigError, match="train.trainable.*'all'"):
        jscale.presets.get("parscale-tiny").override({"model.n_streams": 1,
                                                      "train.trainable": "parscale"})


def test_cli_keys_and_sweep_axes_reach_the_parscale_config():
    cfg = micro_cfg(["model.n_streams=2", "model.smoothing=0.05"], preset="parscale-tiny")
    assert (cfg.model.n_streams, cfg.model.smoothing) == (2, 0.05)
    from jscale import sweep
    runs = sweep.product(cfg, **{"model.n_streams": [1, 2, 4]})
    assert [r.model.n_streams for r in runs] == [1, 2, 4]
    from jscale.sweep.group import signature
    assert len({signature(r) for r in runs}) == 3  # P is a shape: one group per P


def test_sharded_loss_and_gradients_equal_unsharded():
    cfg = micro_cfg(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=4",
                     "train.seq_len=16", "model.n_prefix_tokens=3", "model.n_streams=2"],
                    preset="parscale-tiny")
    layout = make_layout(cfg)
    params = models.init(jax.random.PRNGKey(0), cfg.model)
    specs = sharding.tree_specs(params, layout.mesh)
    assert specs["prefix"]["layers"]["attn"]["prefix_k_LPGSK"] == jax.sharding.PartitionSpec(
        None, None, "tensor")  # the prefix's kv heads split like the real ones
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, 257)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def loss(p, b):
        return loss_fn(p, b, cfg.model)[0]
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params, batch)
    shardings = sharding.tree_shardings(params, layout.mesh)
    got_loss, got_grads = jax.jit(sharding.traced_under(layout, jax.value_and_grad(loss)),
                                  in_shardings=(shardings, layout.batch_sharding()),
                                  out_shardings=(layout.replicated(), shardings))(params, batch)
    np.testing.assert_allclose(got_loss, ref_loss, **SHARDED_VS_SINGLE_LOSS)
    tree_allclose(got_grads, ref_grads, **F32_GRAD)


# --- training: the CLI, two-stage training, resume ----------------------------------------------------

MICRO = ["train.steps=12", "train.batch_size=4", "train.seq_len=32", "train.log_every=4",
         "train.eval_every=12", "train.eval_batches=2", "train.checkpoint_every=6",
         "optim.warmup_steps=2", "model.n_streams=2", "model.n_prefix_tokens=4"]
DENSE = [s for s in MICRO if not s.startswith("model.")]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """``tiny`` (the parscale-tiny backbone) trained 12 steps: the first stage."""
    out = tmp_path_factory.mktemp("dense")
    assert cli_main(train_args(out, DENSE)) == 0
    return out


@pytest.fixture(scope="module")
def parscale_run(tmp_path_factory):
    """``parscale-tiny`` trained 12 steps through the CLI (in this process; a real SIGKILL and
    resume in a fresh process is tests/test_train.py's, MoE's and the sweep's: ParScale has no
    non-gradient state of its own, its prefixes and aggregator are parameters like any other)."""
    out = tmp_path_factory.mktemp("parscale_ref")
    assert cli_main(train_args(out, MICRO, preset="parscale-tiny")) == 0
    return out


def test_init_from_copies_the_base_exactly_and_one_stream_continues_it(dense_run):
    dense_cfg = micro_cfg(DENSE)
    dense = load_state(dense_cfg, dense_run).params
    cfg = micro_cfg(MICRO, preset="parscale-tiny")
    params = init_params_from(dense_run, cfg)
    jax.tree.map(np.testing.assert_array_equal, {k: params[k] for k in dense}, dense)
    fresh = models.init(jax.random.split(jax.random.PRNGKey(0))[0], cfg.model)
    jax.tree.map(np.testing.assert_array_equal, params["prefix"], fresh["prefix"])
    # P = 1: the same model as the dense run's final state, logits for logits.
    one = micro_cfg(MICRO + ["model.n_streams=1"], preset="parscale-tiny")
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 257)
    np.testing.assert_array_equal(_logits(init_params_from(dense_run, one), tokens, one.model),
                                  _logits(dense, tokens, dense_cfg.model))


def test_init_from_a_base_of_another_shape_names_both_shapes(dense_run):
    cfg = micro_cfg(MICRO + ["model.d_ff=256"], preset="parscale-tiny")
    with pytest.raises(ConfigError, match=r"w_down_LFD.*\[2, 384, 128\].*\[2, 256, 128\]"):
        init_params_from(dense_run, cfg)
    with pytest.raises(ConfigError, match="neither a jscale run directory"):
        init_params_from(dense_run / "checkpoints", cfg)


@pytest.mark.slow
def test_frozen_backbone_trains_only_prefixes_and_aggregator(dense_run, tmp_path):
    out = tmp_path / "frozen"
    args = train_args(out, MICRO, "train.trainable=parscale", preset="parscale-tiny")
    assert cli_main(args + ["--init-from", str(dense_run)]) == 0
    cfg = micro_cfg(MICRO + ["train.trainable=parscale"], preset="parscale-tiny")
    start, end = init_params_from(dense_run, cfg), load_state(cfg, out).params
    for key in start:
        same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), start[key],
                                            end[key]))
        assert all(same) if key not in ("prefix", "aggregator") else not any(same), key
    rows = metrics_rows(out)
    assert all(np.isfinite(r["loss"]) for r in rows)
    # The aggregator starts as the streams' mean (weights exactly 1/P = 0.5: w_out_DP is zero) and
    # learns to mix them unevenly.
    assert rows[-1]["stream_weight_max"] > 0.5 + 1e-3


@pytest.mark.slow
def test_parscale_tiny_trains_from_the_cli_and_resumes_bitwise(parscale_run, tmp_path):
    rows = metrics_rows(parscale_run)
    assert [r["step"] for r in rows] == [4, 6, 8, 12]
    assert rows[-1]["loss"] < rows[0]["loss"]
    summary = json.loads((parscale_run / "summary.json").read_text())
    cfg = micro_cfg(MICRO, preset="parscale-tiny")
    assert summary["n_params"] == models.count_params(cfg.model)["total"]
    # As if killed after the step-6 checkpoint: the final checkpoint and the summary gone, the
    # metrics rows past step 6 still there (the resumed run must replace them).
    out = tmp_path / "killed"
    shutil.copytree(parscale_run, out)
    shutil.rmtree(out / "checkpoints" / "12")
    (out / "summary.json").unlink()
    assert cli_main(train_args(out, MICRO, preset="parscale-tiny")) == 0  # the same command resumes
    assert metrics_rows(out) == metrics_rows(parscale_run)
    jax.tree.map(np.testing.assert_array_equal, load_state(cfg, out), load_state(cfg, parscale_run))


# --- the flash-attention kernel with prefixes -----------------------------------------------------

def test_pallas_attention_with_prefixes_equals_xla(tokens_BT):
    """``attention_impl="pallas"`` (the flash-attention kernel with its prefix blocks; interpret mode
    on CPU) ≡ the XLA path through the whole ParScale model: loss and every gradient (prefixes and
    aggregator included), with packed documents."""
    cfg = PARSCALE_MICRO
    pallas = dataclasses.replace(cfg, attention_impl="pallas")
    params = models.init(jax.random.PRNGKey(0), cfg)
    seg = jnp.array([[0] * 4 + [1] * 4, [0] * 8])
    batch = {"inputs": tokens_BT[:, :-1], "targets": tokens_BT[:, 1:], "segment_ids": seg}

    def run(c):
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, c)[0]))(params)
    (v_x, g_x), (v_p, g_p) = run(cfg), run(pallas)
    np.testing.assert_allclose(v_p, v_x, **F32_REORDER)
    tree_allclose(g_p, g_x, **F32_GRAD)


@pytest.mark.parametrize("platform, variant", [("cuda", "gpu"), ("tpu", "tpu")])
def test_parscale_tiny_train_loss_and_grad_with_the_kernel_lower_for_hardware(platform, variant,
                                                                              monkeypatch):
    """parscale-tiny's training loss and gradient with ``attention_impl="pallas"`` export for CUDA
    (Triton) and TPU (Mosaic) at the preset's batch and length: every layer's attention runs the
    kernel forward and backward with the stream's prefix blocks (the model's own call, the kernel
    built for ``variant`` instead of this host's interpret mode)."""
    import functools
    import importlib

    from pallas_kernels.flash_attention import flash_attention as kernel
    cfg = jscale.presets.get("parscale-tiny").override({"model.attention_impl": "pallas"})
    model = cfg.model
    package = importlib.import_module("pallas_kernels.flash_attention")
    monkeypatch.setattr(package, "flash_attention", functools.partial(
        kernel, interpret=False, platform=variant))
    params = jax.eval_shape(lambda: models.init(jax.random.PRNGKey(0), model))
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("inputs", "targets", "segment_ids")}
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, model)[0]))
    target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    checks = [jax.export.DisabledSafetyCheck.custom_call(target)] if platform == "cuda" else []
    exported = jax.export.export(loss_and_grad, platforms=[platform],
                                 disabled_checks=checks)(params, batch)
    assert exported.mlir_module().count(f"custom_call @{target}") >= 2  # forward + backward


# --- incremental decode ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_streams", [1, 3])
def test_decode_with_preloaded_prefixes_equals_the_full_pass(n_streams, tokens_BT):
    """``models.decode_step`` token by token from ``decode_init`` (prefixes pre-loaded into every
    stream's KV cache) gives the full pass's logits at every position; the cache holds ``P·B`` rows
    of ``n_prefix_tokens + max_len`` slots."""
    cfg = dataclasses.replace(PARSCALE_MICRO, n_streams=n_streams)
    params = models.init(jax.random.PRNGKey(0), cfg)
    params = jax.tree.map(lambda x: x + 0.05, params)  # a non-uniform aggregator too
    full = _logits(params, tokens_BT, cfg)
    cache = models.decode_init(params, cfg, B, T)
    k = cache["stacks"]["layers"]["attn"]["k_LBSGK"]
    S = cfg.n_prefix_tokens if n_streams > 1 else 0
    assert k.shape == (cfg.n_layers, n_streams * B, S + T, cfg.n_kv_heads, cfg.k)
    step = jax.jit(lambda p, t, c: models.decode_step(p, t, c, cfg), donate_argnums=2)
    out = []
    for t in range(T):
        logits_BV, cache = step(params, tokens_BT[:, t], cache)
        out.append(logits_BV)
    np.testing.assert_allclose(jnp.stack(out, 1), full, **F32_REORDER)


@pytest.mark.slow
def test_vmapped_parscale_sweep_equals_sequential(tmp_path):
    """Within a group (here P = 2 and two learning rates) the vmapped members train exactly as
    sequential runs (one group per P: test_cli_keys_and_sweep_axes_reach_the_parscale_config)."""
    from tolerances import SWEEP_VMAP_VS_SEQUENTIAL

    from jscale import sweep
    base = micro_cfg(MICRO + ["train.steps=8", "train.checkpoint_every=0"], preset="parscale-tiny")
    runs = sweep.product(base, **{"optim.lr": [3e-3, 1e-3]})  # P = 2: one group of two
    vm = sweep.run(runs, tmp_path / "vmap", strategy="vmap", progress=False)
    seq = sweep.run(runs, tmp_path / "seq", strategy="sequential", progress=False)
    assert set(vm["strategy"]) == {"vmap"} and vm["group_size"].tolist() == [2, 2]
    assert vm["model.n_streams"].tolist() == [2, 2]
    for col in ("final_train_loss", "final_eval_loss", "min_eval_loss"):
        np.testing.assert_allclose(vm[col], seq[col], **SWEEP_VMAP_VS_SEQUENTIAL)


def test_init_from_a_hugging_face_directory(dense_run, tmp_path):
    """``--init-from`` an HF-format directory: the dense base saved with ``jscale.hf.save`` (a
    Llama-format checkpoint: no q/k/v biases) starts a ParScale model with its backbone copied."""
    from jscale import hf
    dense_cfg = micro_cfg(DENSE)
    dense = load_state(dense_cfg, dense_run).params
    hf.save(tmp_path / "hf", dense_cfg.model, dense)
    params = init_params_from(tmp_path / "hf", micro_cfg(MICRO, preset="parscale-tiny"))
    jax.tree.map(np.testing.assert_array_equal, {k: params[k] for k in dense}, dense)
    assert set(params) - set(dense) == {"prefix", "aggregator"}
