"""Flash-attention kernel ≡ reference ≡ ``jax.nn.dot_product_attention`` (values and all three
gradients); the kernels lower for CUDA and TPU; a short training run is unchanged by
``model.attention_impl="pallas"``.

On CPU both kernel variants run in Pallas's interpreter; the same class runs compiled on a GPU
(``-m gpu``) or TPU when one is present.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import FLASH_BF16, FLASH_F32, FLASH_TRAIN_LOSS

import jscale
from jscale import nn
from jscale.train import train
from pallas_kernels import flash_attention
from pallas_kernels.flash_attention import attention_reference
from pallas_kernels.flash_attention import kernel as attention_kernel
from pallas_kernels.flash_attention.ops import DEFAULT_BLOCKS, make_spec

# Tiny shapes, several tiles each, lengths that are not multiples of the tile, GQA ratios 1, 2, 4.
# (B, T, S, H, G, K, causal, segments, dtype, block_q, block_k, scale); segments: None, "self" (one
# [B, T] array) or "pair" (q and kv ids differ, so some queries see no key: zero output).
CASES = {
    "causal-gqa2-ragged-f32": (2, 100, 100, 4, 2, 32, True, None, "float32", 32, 64, None),
    "causal-gqa4-segments-ragged-f32": (1, 150, 150, 4, 1, 32, True, "self", "float32", 64, 32,
                                        None),
    "full-gqa2-segments-bf16": (2, 128, 128, 4, 2, 64, False, "self", "bfloat16", 32, 64, None),
    "cross-full-mha-pair-segments-scaled-f32": (1, 40, 72, 2, 2, 32, False, "pair", "float32", 16,
                                                32, 0.5),
    # Causal with T != S (top-left aligned): T < S leaves key blocks no query sees (the TPU dk/dv
    # grid must not fetch a query block past the last one for them); T > S, queries that see all.
    "causal-short-q-gqa2-f32": (1, 40, 136, 4, 2, 32, True, None, "float32", 16, 16, None),
    "causal-long-q-mha-pair-segments-f32": (1, 72, 40, 2, 2, 32, True, "pair", "float32", 16, 16,
                                            None),
}

ON_GPU = jax.default_backend() == "gpu"
ON_TPU = jax.default_backend() == "tpu"
# (kernel variant, interpret): the same tests on CPU (interpreted) and compiled on hardware.
MODES = [
    pytest.param(("gpu", True), id="gpu-kernel-interpret"),
    pytest.param(("tpu", True), id="tpu-kernel-interpret"),
    pytest.param(("gpu", False), id="gpu-kernel-compiled",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")]),
    pytest.param(("tpu", False), id="tpu-kernel-compiled",
                 marks=pytest.mark.skipif(not ON_TPU, reason="needs a TPU")),
]


@functools.cache
def _inputs(name):
    B, T, S, H, G, K, causal, segments, dtype, *_ = CASES[name]
    kq, kk, kv, ko = jax.random.split(jax.random.PRNGKey(0), 4)
    dt = jnp.dtype(dtype)
    q = jax.random.normal(kq, (B, T, H, K), dt)
    k = jax.random.normal(kk, (B, S, G, K), dt)
    v = jax.random.normal(kv, (B, S, G, K), dt)
    do = jax.random.normal(ko, (B, T, H, K), dt)
    rng = np.random.default_rng(0)
    seg = None
    if segments == "self":  # packed documents: sorted ids, several per row
        seg = jnp.asarray(np.sort(rng.integers(1, 4, (B, T)), axis=1), jnp.int32)
    elif segments == "pair":  # query ids 0..3, key ids 1..3: queries of segment 0 see nothing
        seg = (jnp.asarray(rng.integers(0, 4, (B, T)), jnp.int32),
               jnp.asarray(rng.integers(1, 4, (B, S)), jnp.int32))
    return (q, k, v, do), seg


def _run(fn, *args):
    """``jax.jit(fn)(*args)``; on CPU compiled without LLVM optimizations (the programs run for
    milliseconds; compiling them is what a test's time goes to)."""
    lowered = jax.jit(fn).lower(*args)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(options)(*args)


def _value_and_grads(attn, name, **kw):
    """``(out, dq, dk, dv)`` of ``attn`` on case ``name``, one program."""
    (q, k, v, do), seg = _inputs(name)
    causal, scale = CASES[name][6], CASES[name][11]

    def run(q, k, v, do, seg):
        out, vjp = jax.vjp(
            lambda q, k, v: attn(q, k, v, causal=causal, segment_ids=seg, scale=scale, **kw),
            q, k, v)
        return (out, *vjp(do))

    return [np.asarray(x.astype(jnp.float32)) for x in _run(run, q, k, v, do, seg)]


def _dot_product_attention(q, k, v, *, causal, segment_ids, scale):
    mask = None if segment_ids is None else nn.segment_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, scale=scale,
                                        implementation="xla")


@functools.cache
def _expected(name):
    """Reference and ``jax.nn.dot_product_attention`` results (one program, once per case).

    ``jax.nn`` gives a query that sees no key a uniform average instead of zeros, so it is left out
    of the "pair" case."""
    with_dpa = CASES[name][7] != "pair"

    def both(q, k, v, **kw):
        ref = attention_reference(q, k, v, **kw)
        return ref, (_dot_product_attention(q, k, v, **kw) if with_dpa else ref)

    (q, k, v, do), seg = _inputs(name)
    causal, scale = CASES[name][6], CASES[name][11]

    def run(q, k, v, do, seg):
        outs, vjp = jax.vjp(lambda q, k, v: both(q, k, v, causal=causal, segment_ids=seg,
                                                 scale=scale), q, k, v)
        ref = (outs[0], *vjp((do, jnp.zeros_like(do))))
        dpa = (outs[1], *vjp((jnp.zeros_like(do), do)))
        return ref, dpa

    with jax.default_matmul_precision("highest"):  # no TF32 in XLA's float32 dots on GPUs
        results = _run(run, q, k, v, do, seg)
    ref, dpa = jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32)), results)
    return ref, (dpa if with_dpa else None)


def _tol(name):
    return FLASH_BF16 if CASES[name][8] == "bfloat16" else FLASH_F32


@pytest.mark.parametrize("mode", MODES)
class TestFlashAttention:
    @pytest.mark.parametrize("name", list(CASES))
    def test_values_and_grads_match_reference_and_jax(self, mode, name):
        variant, interpret = mode
        block_q, block_k = CASES[name][9:11]
        if not interpret and variant == "tpu":  # Mosaic TPU tiles: key blocks of 128 lanes
            block_q, block_k = 128, 128
        got = _value_and_grads(flash_attention, name, impl="pallas", platform=variant,
                               interpret=interpret, block_q=block_q, block_k=block_k)
        ref, dpa = _expected(name)
        for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
            np.testing.assert_allclose(g, r, **_tol(name), err_msg=f"{what} vs reference")
            assert np.all(np.isfinite(g)), what
        if dpa is not None:
            for what, g, d in zip(("out", "dq", "dk", "dv"), got, dpa, strict=True):
                np.testing.assert_allclose(g, d, **_tol(name), err_msg=f"{what} vs jax.nn")
        if CASES[name][7] == "pair":  # queries that see no key: zero output and zero dq
            (_, _, _, _), (q_seg, kv_seg) = _inputs(name)
            empty = ~np.asarray((q_seg[:, :, None] == kv_seg[:, None, :]).any(-1))
            assert empty.any()
            assert np.all(got[0][empty] == 0) and np.all(got[1][empty] == 0)

    def test_kernel_path_runs(self, mode):
        """The pallas impl really calls the three kernels (no silent fallback); "xla" calls none."""
        variant, interpret = mode
        (q, k, v, _), seg = _inputs("causal-gqa4-segments-ragged-f32")

        def loss(q, k, v, impl):
            return flash_attention(q, k, v, segment_ids=seg, impl=impl, platform=variant,
                                   interpret=interpret).sum()

        text = str(jax.make_jaxpr(jax.grad(functools.partial(loss, impl="pallas"),
                                           argnums=(0, 1, 2)))(q, k, v))
        for kernel in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"):
            assert kernel in text, kernel
        text = str(jax.make_jaxpr(jax.grad(functools.partial(loss, impl="xla")))(q, k, v))
        assert "pallas_call" not in text


@pytest.mark.parametrize("T, S, causal, segments, blocks", [
    (256, 1024, True, False, (128, 128)),   # T < S
    (130, 1000, True, False, (128, 128)),   # T < S, ragged: padded keys
    (130, 1000, True, True, (None, None)),  # with segment ids; default tiles (512 fwd, 256 bwd)
    (1000, 300, True, False, (None, None)),  # T > S
    (300, 300, True, True, (128, 128)),
    (256, 1024, False, False, (128, 128)),
])
def test_tpu_grid_block_indices_stay_in_range(T, S, causal, segments, blocks):
    """Every block a TPU grid kernel fetches is inside its array, at every grid point, and is the
    grid's own block wherever that block is computed. Interpret mode clamps an out-of-range index
    (so value tests cannot see one); a TPU would DMA out of bounds. (256, 1024) causal: key blocks
    2..7 have no query, and the dk/dv map once asked for query block 7 of 2."""
    spec = make_spec((1, T, 2, 64), (1, S, 1, 64), causal=causal, scale=1.0, segments=segments,
                     variant="tpu", interpret=False, block_q=blocks[0], block_k=blocks[1])
    for bq, bk in ((spec.block_q, spec.block_k), (spec.block_q_bwd, spec.block_k_bwd)):
        nq, nk = spec.t_pad // bq, spec.s_pad // bk
        i, j = jnp.arange(nq)[:, None], jnp.arange(nk)[None, :]  # grid points [query, key block]
        kv = np.broadcast_to(attention_kernel.kv_block_index(i, j, bq, bk, spec), (nq, nk))  # fwd, dq
        q = np.broadcast_to(attention_kernel.q_block_index(j, i, bq, bk, spec), (nq, nk))  # dk/dv
        assert kv.min() >= 0 and kv.max() < nk, kv
        assert q.min() >= 0 and q.max() < nq, q
        # Blocks that are computed are fetched as themselves: causally, query block i needs key
        # blocks j with j·bk <= last query of i, key block j the query blocks i with i·bq + bq > j·bk.
        ii, jj = np.meshgrid(np.arange(nq), np.arange(nk), indexing="ij")
        needed = (jj * bk <= ii * bq + bq - 1) if causal else np.ones_like(ii, bool)
        np.testing.assert_array_equal(kv[needed], jj[needed])
        np.testing.assert_array_equal(q[needed], ii[needed])


def test_auto_impl_is_xla_until_validated_for_both_kernels(monkeypatch):
    """One ``impl="auto"`` policy (pallas_kernels._policy): the XLA path on every platform until a
    kernel's compiled tests have passed there; then the kernel, on that platform only."""
    from pallas_kernels import _policy
    from pallas_kernels.flash_attention import ops as attention_ops
    from pallas_kernels.selective_scan import ops as scan_ops

    resolvers = {"flash_attention": attention_ops.resolve_impl,
                 "selective_scan": scan_ops.resolve_impl}
    monkeypatch.setattr(_policy, "VALIDATED", {name: {} for name in resolvers})
    monkeypatch.setattr(scan_ops, "_gpu_is_hopper_or_newer", lambda: True)
    for resolve in resolvers.values():
        for platform in _policy.PLATFORMS:
            assert resolve("auto", platform) == "xla", platform
            assert resolve("pallas", platform) == "pallas" and resolve("xla", platform) == "xla"
    for name, resolve in resolvers.items():
        for where in ("gpu", "tpu"):
            with monkeypatch.context() as m:
                m.setitem(_policy.VALIDATED[name], where, (jax.__version__, "2026-11-20"))
                for platform in _policy.PLATFORMS:
                    assert resolve("auto", platform) == ("pallas" if platform == where else "xla")
                other = next(n for n in resolvers if n != name)
                assert resolvers[other]("auto", where) == "xla"  # one record per kernel
    # The scan's GPU kernel is Mosaic GPU: a recorded GPU older than Hopper stays on XLA.
    monkeypatch.setitem(_policy.VALIDATED["selective_scan"], "gpu", (jax.__version__, "2026-11-20"))
    monkeypatch.setattr(scan_ops, "_gpu_is_hopper_or_newer", lambda: False)
    assert scan_ops.resolve_impl("auto", "gpu") == "xla"

    # The public functions follow the record on the default backend (the kernels run interpreted
    # when the CPU itself is recorded, which only this test does).
    (q, k, v, _), _ = _inputs("causal-gqa2-ragged-f32")
    x = jnp.zeros((1, 16, 8))
    scan_args = (x, x + 0.1, -jnp.ones((8, 4)), jnp.zeros((1, 16, 4)), jnp.zeros((1, 16, 4)))
    backend = jax.default_backend()
    for record in ({}, {backend: (jax.__version__, "2026-11-20")}):
        monkeypatch.setattr(_policy, "VALIDATED",
                            {"flash_attention": dict(record), "selective_scan": dict(record)})
        attention = str(jax.make_jaxpr(lambda q, k, v: flash_attention(q, k, v))(q, k, v))
        scan = str(jax.make_jaxpr(lambda *a: scan_ops.selective_scan(*a))(*scan_args))
        assert ("pallas_call" in attention) == bool(record), record
        if backend != "gpu":  # (a recorded GPU also needs Hopper for the scan)
            assert ("pallas_call" in scan) == bool(record), record


@pytest.mark.parametrize("platform, variant", [("cuda", "gpu"), ("tpu", "tpu")])
@pytest.mark.parametrize("causal, segments, dtype, K", [(True, True, "bfloat16", 64),
                                                        (False, False, "float32", 48)])
def test_forward_and_backward_lower_for_hardware(platform, variant, causal, segments, dtype, K):
    """On any machine: the kernels lower to Triton (CUDA) / Mosaic (TPU) custom calls."""
    B, T, H, G = 2, 1000, 8, 2  # T not a multiple of any block
    q = jax.ShapeDtypeStruct((B, T, H, K), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((B, T, G, K), jnp.dtype(dtype))
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32) if segments else None

    def loss(q, k, v, seg):
        out = flash_attention(q, k, v, causal=causal, segment_ids=seg, impl="pallas",
                              interpret=False, platform=variant)
        return out.astype(jnp.float32).sum()

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    text = fwd_bwd.trace(q, kv, kv, seg).lower(lowering_platforms=(platform,)).as_text()
    target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    assert text.count(f"custom_call @{target}") == 3  # forward, dq, dk/dv


def test_bad_blocks_and_arguments_raise():
    (q, k, v, _), _ = _inputs("causal-gqa2-ragged-f32")
    with pytest.raises(ValueError, match="power of two"):
        jax.eval_shape(lambda: flash_attention(q, k, v, impl="pallas", interpret=False,
                                               platform="gpu", block_q=48))
    with pytest.raises(ValueError, match="multiple of 128"):
        jax.eval_shape(lambda: flash_attention(q, k, v, impl="pallas", interpret=False,
                                               platform="tpu", block_k=64))
    with pytest.raises(ValueError, match="impl must be one of"):
        flash_attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match="G must divide H"):
        flash_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    assert set(DEFAULT_BLOCKS) == {"cpu", "gpu", "tpu"}


@pytest.mark.slow
def test_tiny_training_run_with_kernel_matches_xla(tmp_path):
    """20 steps of a reduced ``tiny`` preset with each impl (segment ids from the data pipeline)."""
    def losses(impl):
        cfg = jscale.presets.get("tiny").override({
            "model.attention_impl": impl, "model.n_layers": 1, "train.steps": 20,
            "train.batch_size": 4, "train.seq_len": 64, "train.log_every": 1,
            "train.eval_every": 0, "train.eval_batches": 1, "train.checkpoint_every": 0})
        with jax.default_matmul_precision("highest"):  # XLA's float32 dots exact on GPUs too
            train(cfg, tmp_path / impl, quiet=True)
        rows = (tmp_path / impl / "metrics.jsonl").read_text().splitlines()
        return np.array([json.loads(r)["loss"] for r in rows])

    xla, pallas = losses("xla"), losses("pallas")
    assert len(xla) == 20 and xla[-1] < xla[0]  # it learns
    np.testing.assert_allclose(pallas, xla, **FLASH_TRAIN_LOSS)
