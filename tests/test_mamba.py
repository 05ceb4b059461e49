"""Mamba specifics: the block ≡ a port of mamba_simple, a document alone ≡ the same document packed,
recurrent decode ≡ full pass, the Pallas scan lowering for CUDA, config errors, and Pallas ≡ XLA
scan in training. The invariants every family meets (causality, document isolation, scan ≡ loop,
counts ≡ tree, FLOPs ≡ XLA, presets build) are in tests/test_families.py."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import MAMBA_MICRO
from tolerances import F32_FORMULA_RTOL, F32_REORDER, SCAN_TRAIN_LOSS

import jscale
from jscale import nn
from jscale.models import mamba
from jscale.models.mamba import MambaConfig
from jscale.train import loss_fn, train
from pallas_kernels.selective_scan import kernel as scan_kernel

CFG = MAMBA_MICRO
B, T = 2, 13


@pytest.fixture(scope="module")
def params():
    return jscale.init(jax.random.PRNGKey(0), CFG)


@pytest.fixture(scope="module")
def tokens_BT():
    return jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (B, T)), jnp.int32)


@pytest.fixture(scope="module")
def logits_fn():
    return jax.jit(lambda p, t, s: jscale.apply(p, t, CFG, segment_ids_BT=s)[0])


def test_param_tree_layout_and_init(params):
    F, N, J = CFG.d_inner, CFG.d_state, CFG.rank
    m = params["layers"]["mixer"]
    assert (F, J) == (32, 1) and "head" not in params
    assert m["w_in_x_LDF"].shape == (2, 16, 32) and m["w_conv_LWF"].shape == (2, 4, 32)
    assert m["w_x_dt_LFJ"].shape == (2, 32, 1) and m["a_log_LFN"].shape == (2, 32, 4)
    np.testing.assert_allclose(m["a_log_LFN"], np.broadcast_to(np.log(np.arange(1, N + 1)),
                                                               (2, F, N)), rtol=F32_FORMULA_RTOL)
    np.testing.assert_array_equal(m["skip_LF"], 1.0)
    dt = np.log1p(np.exp(np.asarray(m["b_dt_LF"], np.float64)))        # softplus(bias) = Δ init
    assert np.all(dt >= CFG.dt_min * 0.999) and np.all(dt <= CFG.dt_max * 1.001)
    assert np.all(np.abs(m["w_dt_LJF"]) <= J ** -0.5)


def _numpy_mamba_simple(h_BTD, m):
    """``Mamba.forward`` of mamba_simple.py (the slow path: nn.Conv1d + selective_scan_ref),
    transcribed in float64 numpy with PyTorch's weight layouts and [batch, dim, length] tensors."""
    f64 = {k: np.asarray(v, np.float64) for k, v in m.items()}
    in_proj = np.concatenate([f64["w_in_x_DF"].T, f64["w_in_z_DF"].T])          # (2F, D)
    conv_w = f64["w_conv_WF"].T[:, None, :]                                      # (F, 1, W)
    x_proj = np.concatenate([f64["w_x_dt_FJ"].T, f64["w_x_b_FN"].T, f64["w_x_c_FN"].T])
    dt_proj_w, dt_proj_b = f64["w_dt_JF"].T, f64["b_dt_F"]                      # (F, J), (F,)
    out_proj = f64["w_out_FD"].T                                                 # (D, F)
    hs = np.asarray(h_BTD, np.float64)
    batch, seqlen, _ = hs.shape
    xz = np.einsum("ed,bld->bel", in_proj, hs)
    x, z = np.split(xz, 2, axis=1)
    width = conv_w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (width - 1, width - 1)))                       # padding=W-1
    conv = np.stack([np.sum(xp[:, :, i:i + width] * conv_w[:, 0], -1)
                     for i in range(xp.shape[-1] - width + 1)], -1)[..., :seqlen]
    x = conv + f64["b_conv_F"][:, None]
    x = x / (1 + np.exp(-x))
    x_dbl = np.einsum("rf,bfl->blr", x_proj, x)
    rank, n = dt_proj_w.shape[1], f64["a_log_FN"].shape[1]
    dt, Bm, Cm = x_dbl[..., :rank], x_dbl[..., rank:rank + n], x_dbl[..., rank + n:]
    delta = np.einsum("fj,blj->bfl", dt_proj_w, dt) + dt_proj_b[:, None]
    delta = np.where(delta <= 20, np.log1p(np.exp(np.minimum(delta, 20))), delta)
    A = -np.exp(f64["a_log_FN"])
    state = np.zeros((batch, x.shape[1], n))
    ys = []
    for i in range(seqlen):
        state = (np.exp(delta[:, :, i, None] * A) * state
                 + (delta[:, :, i] * x[:, :, i])[..., None] * Bm[:, i, None, :])
        ys.append(np.einsum("bfn,bn->bf", state, Cm[:, i]))
    y = np.stack(ys, -1) + x * f64["skip_F"][:, None]
    y = y * z / (1 + np.exp(-z))
    return np.einsum("df,bfl->bld", out_proj, y)


def test_block_matches_mamba_simple(params):
    m = nn.unstack_names(jax.tree.map(lambda a: a[0], params["layers"]["mixer"]))
    h_BTD = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, CFG.d_model)), jnp.float32)
    got = jax.jit(lambda h, m: mamba.mixer(h, m, CFG))(h_BTD, m)
    np.testing.assert_allclose(got, _numpy_mamba_simple(h_BTD, m), **F32_REORDER)


def test_second_document_alone_equals_packed(params, tokens_BT, logits_fn):
    """Conv and scan state restart at a document boundary: the second document alone, from a fresh
    state, gives the logits it gets packed after the first (isolation itself: test_families.py)."""
    seg_BT = jnp.array([[1] * 5 + [2] * 8] * B)
    base = logits_fn(params, tokens_BT, seg_BT)
    alone = logits_fn(params, jnp.pad(tokens_BT[:, 5:], ((0, 0), (0, 5))), jnp.ones_like(seg_BT))
    np.testing.assert_allclose(base[:, 5:], alone[:, :8], **F32_REORDER)


def test_step_by_step_decode_equals_full_pass(params, tokens_BT, logits_fn):
    full = logits_fn(params, tokens_BT, jnp.ones_like(tokens_BT))
    step = jax.jit(lambda p, tok, s: mamba.step(p, tok, s, CFG))
    state = mamba.init_state(CFG, B)
    logits = []
    for i in range(T):
        lg, state = step(params, tokens_BT[:, i], state)
        logits.append(lg)
    np.testing.assert_allclose(np.stack(logits, 1), full, **F32_REORDER)
    assert state["ssm_LBFN"].shape == (2, B, CFG.d_inner, CFG.d_state)


def _mamba_presets():
    names = [n for n in jscale.presets.names()
             if isinstance(jscale.presets.get(n).model, MambaConfig)]
    assert {"mamba-tiny", "mamba-small"} <= set(names)
    return names


@pytest.mark.parametrize("preset", _mamba_presets())
def test_preset_train_loss_and_grad_with_pallas_scan_lower_for_cuda(preset, monkeypatch):
    """Every Mamba preset's training loss and gradient, with ``model.scan_impl="pallas"`` and the
    segment ids every training batch carries (so the scan gets resets), exports for CUDA at the
    preset's batch, length and dtype: both Mosaic GPU kernels lower, which Mosaic GPU refuses if a
    kernel needs more shared memory than 227 KB. The float32 backward once needed 234,504 B.

    The model's own call, except for ``target="gpu"``: on this CPU host the kernel would otherwise
    be built for the default backend (interpret mode)."""
    cfg = jscale.presets.get(preset).override({"model.scan_impl": "pallas"})
    model = cfg.model
    monkeypatch.setattr(mamba, "selective_scan", functools.partial(
        mamba.selective_scan, interpret=False, target="gpu"))
    # The plan the model's call gets, and its shared memory, checked explicitly too.
    itemsize = jnp.dtype(model.dtype).itemsize
    plan = scan_kernel.plan_for(
        "mosaic_gpu", seq_len=cfg.train.seq_len, d=model.d_inner, n=model.d_state,
        chunk=model.scan_chunk, block_d=None, orientation=None, has_z=True, has_d=True,
        has_bias=True, has_reset=True, softplus=True, itemsize=itemsize)[0]
    smem = scan_kernel.gpu_backward_smem_bytes(
        chunk=plan.chunk, block_d=plan.block_d, n=model.d_state, itemsize=itemsize, has_z=True,
        has_d=True, has_bias=True, has_reset=True)
    assert smem <= scan_kernel.GPU_SMEM_BYTES, (plan, smem)

    params = jax.eval_shape(lambda: jscale.init(jax.random.PRNGKey(0), model))
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("inputs", "targets", "segment_ids")}
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, model)[0]))
    exported = jax.export.export(loss_and_grad, platforms=["cuda"])(params, batch)
    text = exported.mlir_module()
    assert text.count("custom_call @mosaic_gpu") >= 2  # forward and backward (in the layer scan)


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_state=0), r"model\.d_state: must be > 0"),
    (dict(dt_rank=0), r"model\.dt_rank: must be 'auto' or an int > 0"),
    (dict(dt_min=0.5, dt_max=0.1), r"model\.dt_min: must be <= model\.dt_max=0\.1"),
    (dict(scan_impl="cuda"), r"model\.scan_impl: must be one of"),
    (dict(remat="dots"), r"model\.remat: must be one of"),
    (dict(dtype="float64"), r"model\.dtype: must be one of"),
    (dict(scan_chunk=0), r"model\.scan_chunk: must be > 0 or None"),
])
def test_bad_model_config_raises(kwargs, match):
    with pytest.raises(jscale.ConfigError, match=match):
        dataclasses.replace(CFG, **kwargs)


def test_run_config_round_trip_and_overrides():
    cfg = jscale.presets.get("mamba-tiny").override({"model.dt_rank": "4",
                                                     "model.scan_impl": "xla"})
    assert cfg.model.dt_rank == 4 and cfg.model.scan_impl == "xla"
    assert jscale.RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.to_dict()["model"]["family"] == "mamba"


#: A reduced mamba-tiny: seconds per run on 2 CPU cores even with the Pallas kernel interpreted.
MICRO = {"model.d_model": 32, "model.n_layers": 2, "model.d_state": 8, "model.scan_chunk": 16,
         "train.seq_len": 40, "train.batch_size": 4, "train.steps": 20, "train.log_every": 5,
         "train.eval_every": 0, "train.eval_batches": 1, "train.checkpoint_every": 0,
         "optim.warmup_steps": 4}


@pytest.mark.slow
def test_training_with_pallas_scan_matches_xla(tmp_path):
    """20 steps of a reduced mamba-tiny: the Pallas kernel (interpret mode) and the XLA scan give
    the same losses, and the model learns."""
    rows = {}
    for impl in ("pallas", "xla"):
        cfg = jscale.presets.get("mamba-tiny").override({**MICRO, "model.scan_impl": impl})
        summary = train(cfg, tmp_path / impl, quiet=True)
        assert summary["diverged"] is False
        assert summary["n_params"] == jscale.count_params(cfg.model)["total"]
        lines = (tmp_path / impl / "metrics.jsonl").read_text().splitlines()
        rows[impl] = [json.loads(line)["loss"] for line in lines]
    assert len(rows["pallas"]) == 4
    np.testing.assert_allclose(rows["pallas"], rows["xla"], **SCAN_TRAIN_LOSS)
    assert rows["xla"][-1] < rows["xla"][0] - 0.5, rows["xla"]  # it learns
