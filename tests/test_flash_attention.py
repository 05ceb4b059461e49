"""Flash-attention kernel ≡ reference ≡ ``jax.nn.dot_product_attention`` (values and all three
gradients); with prefix keys/values (ParScale), reference ≡ a dense numpy computation and kernel ≡
reference (values and all five gradients); the kernels lower for CUDA and TPU; a short training run
is unchanged by ``model.attention_impl="pallas"``.

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
from pallas_kernels.flash_attention import ops as attention_ops
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

# With prefix keys/values: (B, T, S, H, G, K, S_p, causal, segments, dtype, (fwd, bwd) tiles). The
# forward and backward key tiles differ, so the prefix (padded to a multiple of both) ends with a
# block of padding only in one of them, which that kernel must skip; S_p is never a multiple of the
# larger key tile. "pair": queries of segment 0 see no real key — the prefix is all they see.
PREFIX_CASES = {
    "prefix5-causal-gqa2-ragged-f32": (1, 40, 40, 4, 2, 32, 5, True, None, "float32",
                                       ((16, 16), (16, 32))),
    "prefix48-causal-gqa2-segments-ragged-f32": (2, 50, 50, 4, 2, 32, 48, True, "self", "float32",
                                                 ((16, 32), (16, 16))),
    "prefix20-causal-short-q-gqa2-pair-segments-bf16": (1, 40, 56, 4, 2, 32, 20, True, "pair",
                                                        "bfloat16", ((16, 16), (16, 32))),
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


def _segments(kind, B, T, S, rng):
    """None, sorted packed-document ids ``[B, T]`` ("self") or a pair ``(q 0..3, kv 1..3)``."""
    if kind == "self":
        return jnp.asarray(np.sort(rng.integers(1, 4, (B, T)), axis=1), jnp.int32)
    if kind == "pair":
        return (jnp.asarray(rng.integers(0, 4, (B, T)), jnp.int32),
                jnp.asarray(rng.integers(1, 4, (B, S)), jnp.int32))
    return None


@functools.cache
def _prefix_inputs(name):
    """``(q, k, v, prefix_k, prefix_v, do), segment_ids`` of prefix case ``name``."""
    B, T, S, H, G, K, S_p, _, segments, dtype, _ = PREFIX_CASES[name]
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    shapes = [(B, T, H, K), (B, S, G, K), (B, S, G, K), (B, S_p, G, K), (B, S_p, G, K),
              (B, T, H, K)]
    arrays = tuple(jax.random.normal(key, shape, jnp.dtype(dtype))
                   for key, shape in zip(keys, shapes, strict=True))
    return arrays, _segments(segments, B, T, S, np.random.default_rng(1))


def _prefix_value_and_grads(attn, name, **kw):
    """``(out, dq, dk, dv, dprefix_k, dprefix_v)`` of ``attn`` on prefix case ``name``."""
    (q, k, v, pk, pv, do), seg = _prefix_inputs(name)
    causal = PREFIX_CASES[name][7]

    def run(q, k, v, pk, pv, do, seg):
        out, vjp = jax.vjp(lambda q, k, v, pk, pv: attn(q, k, v, causal=causal, segment_ids=seg,
                                                         prefix_k=pk, prefix_v=pv, **kw),
                           q, k, v, pk, pv)
        return (out, *vjp(do))

    return [np.asarray(x.astype(jnp.float32)) for x in _run(run, q, k, v, pk, pv, do, seg)]


@functools.cache
def _prefix_expected(name):
    with jax.default_matmul_precision("highest"):  # no TF32 in XLA's float32 dots on GPUs
        return _prefix_value_and_grads(attention_reference, name)


def _prefix_tol(name):
    return FLASH_BF16 if PREFIX_CASES[name][9] == "bfloat16" else FLASH_F32


def _dense_prefix_attention(q, k, v, pk, pv, *, causal, segment_ids):
    """Prefix attention in float64 numpy, written out independently of the package: the prefix
    keys concatenated in front, a mask whose prefix columns are all True and whose real columns
    are causal & same segment, a softmax over each row."""
    q, k, v, pk, pv = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                       for x in (q, k, v, pk, pv))
    B, T, H, K = q.shape
    S, G, S_p = k.shape[1], k.shape[2], pk.shape[1]
    keys = np.repeat(np.concatenate([pk, k], axis=1), H // G, axis=2)  # head h reads h // (H/G)
    values = np.repeat(np.concatenate([pv, v], axis=1), H // G, axis=2)
    mask = np.ones((B, T, S_p + S), bool)
    if causal:
        mask[:, :, S_p:] &= np.arange(S)[None, :] <= np.arange(T)[:, None]
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,) * 2
        q_seg, kv_seg = np.asarray(q_seg), np.asarray(kv_seg)
        mask[:, :, S_p:] &= q_seg[:, :, None] == kv_seg[:, None, :]
    scores = np.einsum("bthk,bshk->bhts", q, keys) / np.sqrt(K)
    scores = np.where(mask[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshk->bthk", weights, values)


@pytest.mark.parametrize("name", list(PREFIX_CASES))
def test_reference_with_prefix_matches_dense_numpy(name):
    """``attention_reference`` with prefix keys/values ≡ the dense float64 computation above (the
    ``impl="xla"`` path is the reference too)."""
    (q, k, v, pk, pv, _), seg = _prefix_inputs(name)
    causal = PREFIX_CASES[name][7]
    expected = _dense_prefix_attention(q, k, v, pk, pv, causal=causal, segment_ids=seg)

    def both(q, k, v, pk, pv, seg):
        kw = dict(causal=causal, segment_ids=seg, prefix_k=pk, prefix_v=pv)
        return attention_reference(q, k, v, **kw), flash_attention(q, k, v, impl="xla", **kw)

    with jax.default_matmul_precision("highest"):
        got = _run(both, q, k, v, pk, pv, seg)
    for impl, out in zip(("reference", "xla"), got, strict=True):
        np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected,
                                   **_prefix_tol(name), err_msg=impl)


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

    @pytest.mark.parametrize("name", list(PREFIX_CASES))
    def test_prefix_values_and_grads_match_reference(self, mode, name, monkeypatch):
        """With prefix keys/values: kernel ≡ reference, the output and the gradients of q, k, v,
        prefix_k and prefix_v; queries that see no real key attend to the prefix alone."""
        variant, interpret = mode
        fwd, bwd = PREFIX_CASES[name][10]
        blocks = {}
        if not interpret and variant == "tpu":  # Mosaic TPU tiles: key blocks of 128 lanes
            blocks = {"block_q": 128, "block_k": 128}
        else:  # the case's forward and backward tiles, by the defaults of where it runs
            where = "cpu" if interpret else variant
            monkeypatch.setitem(attention_ops.DEFAULT_BLOCKS, where, {"fwd": fwd, "bwd": bwd})
        got = _prefix_value_and_grads(flash_attention, name, impl="pallas", platform=variant,
                                      interpret=interpret, **blocks)
        ref = _prefix_expected(name)
        whats = ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v")
        for what, g, r in zip(whats, got, ref, strict=True):
            np.testing.assert_allclose(g, r, **_prefix_tol(name), err_msg=f"{what} vs reference")
            assert np.all(np.isfinite(g)), what
        if PREFIX_CASES[name][8] == "pair":  # no real key visible: attention over the prefix only
            (q, _, _, pk, pv, _), (q_seg, kv_seg) = _prefix_inputs(name)
            empty = ~np.asarray((q_seg[:, :, None] == kv_seg[:, None, :]).any(-1))
            assert empty.any()
            with jax.default_matmul_precision("highest"):
                prefix_only = attention_reference(q, pk, pv, causal=False)
            prefix_only = np.asarray(prefix_only.astype(jnp.float32))
            np.testing.assert_allclose(got[0][empty], prefix_only[empty], **_prefix_tol(name))
            assert np.all(np.abs(got[0][empty]).max(-1) > 0)

    def test_prefix_is_all_a_query_sees_when_its_real_keys_are_masked(self, mode):
        """Queries whose segment has no key (and a causal first token of each document, which sees
        itself) still attend to the prefix: an output row that sees only the prefix is exactly
        attention over the prefix alone; the others see the prefix and their document."""
        variant, interpret = mode
        B, T, H, G, K, S_p = 1, 24, 2, 1, 32, 5
        keys = jax.random.split(jax.random.PRNGKey(2), 5)
        q = jax.random.normal(keys[0], (B, T, H, K))
        k, v = (jax.random.normal(key, (B, T, G, K)) for key in keys[1:3])
        pk, pv = (jax.random.normal(key, (B, S_p, G, K)) for key in keys[3:])
        q_seg = jnp.asarray([[0] * 8 + [1] * 8 + [2] * 8], jnp.int32)  # segment 0: no keys
        kv_seg = jnp.asarray([[3] * 8 + [1] * 8 + [2] * 8], jnp.int32)
        blocks = {"block_q": 128, "block_k": 128} if not interpret and variant == "tpu" else {
            "block_q": 8, "block_k": 8} if interpret else {"block_q": 16, "block_k": 16}
        got = np.asarray(_run(lambda *a: flash_attention(
            *a[:3], causal=True, segment_ids=(q_seg, kv_seg), prefix_k=a[3], prefix_v=a[4],
            impl="pallas", platform=variant, interpret=interpret, **blocks), q, k, v, pk, pv))
        with jax.default_matmul_precision("highest"):
            prefix_only = np.asarray(attention_reference(q, pk, pv, causal=False))
        np.testing.assert_allclose(got[:, :8], prefix_only[:, :8], **FLASH_F32)
        expected = _dense_prefix_attention(q, k, v, pk, pv, causal=True,
                                           segment_ids=(q_seg, kv_seg))
        np.testing.assert_allclose(got, expected, **FLASH_F32)
        assert not np.allclose(got[:, 8], prefix_only[:, 8], **FLASH_F32)  # sees itself, too

    @pytest.mark.parametrize("prefixed", [False, True], ids=["no-prefix", "prefix"])
    def test_kernel_path_runs(self, mode, prefixed):
        """The pallas impl really calls the three kernels (no silent fallback); "xla" calls none."""
        variant, interpret = mode
        (q, k, v, _), seg = _inputs("causal-gqa4-segments-ragged-f32")
        prefix = (k[:, :7], v[:, :7]) if prefixed else (None, None)

        def loss(q, k, v, pk, pv, impl):
            return flash_attention(q, k, v, segment_ids=seg, prefix_k=pk, prefix_v=pv, impl=impl,
                                   platform=variant, interpret=interpret).sum()

        argnums = (0, 1, 2, 3, 4) if prefixed else (0, 1, 2)
        text = str(jax.make_jaxpr(jax.grad(functools.partial(loss, impl="pallas"),
                                           argnums=argnums))(q, k, v, *prefix))
        for kernel in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"):
            assert kernel in text, kernel
        text = str(jax.make_jaxpr(jax.grad(functools.partial(loss, impl="xla"),
                                           argnums=argnums))(q, k, v, *prefix))
        assert "pallas_call" not in text


@pytest.mark.parametrize("T, S, causal, segments, blocks, n_prefix", [
    (256, 1024, True, False, (128, 128), 0),   # T < S
    (130, 1000, True, False, (128, 128), 0),   # T < S, ragged: padded keys
    (130, 1000, True, True, (None, None), 0),  # with segment ids; default tiles (512 fwd, 256 bwd)
    (1000, 300, True, False, (None, None), 0),  # T > S
    (300, 300, True, True, (128, 128), 0),
    (256, 1024, False, False, (128, 128), 0),
    # Prefixes: padded to 512 by the default tiles, the backward's key block 1 is padding only.
    (130, 1000, True, True, (None, None), 48),
    (256, 1024, True, False, (128, 128), 300),
])
def test_tpu_grid_block_indices_stay_in_range(T, S, causal, segments, blocks, n_prefix):
    """Every block a TPU grid kernel fetches is inside its array, at every grid point, and is the
    grid's own block wherever that block is computed. Interpret mode clamps an out-of-range index
    (so value tests cannot see one); a TPU would DMA out of bounds. (256, 1024) causal: key blocks
    2..7 have no query, and the dk/dv map once asked for query block 7 of 2. With a prefix, every
    query block computes every prefix block holding a prefix key."""
    spec = make_spec((1, T, 2, 64), (1, S, 1, 64), causal=causal, scale=1.0, segments=segments,
                     variant="tpu", interpret=False, block_q=blocks[0], block_k=blocks[1],
                     n_prefix=n_prefix)
    for bq, bk in ((spec.block_q, spec.block_k), (spec.block_q_bwd, spec.block_k_bwd)):
        nq, nk = spec.t_pad // bq, (spec.prefix_pad + spec.s_pad) // bk
        off = spec.prefix_pad // bk  # key blocks [0, off) are the padded prefix
        i, j = jnp.arange(nq)[:, None], jnp.arange(nk)[None, :]  # grid points [query, key block]
        kv = np.broadcast_to(attention_kernel.kv_block_index(i, j, bq, bk, spec), (nq, nk))  # fwd, dq
        q = np.broadcast_to(attention_kernel.q_block_index(j, i, bq, bk, spec), (nq, nk))  # dk/dv
        assert kv.min() >= 0 and kv.max() < nk, kv
        assert q.min() >= 0 and q.max() < nq, q
        # Blocks that are computed are fetched as themselves: causally, query block i needs key
        # blocks j with j·bk <= last query of i, key block j the query blocks i with i·bq + bq > j·bk.
        ii, jj = np.meshgrid(np.arange(nq), np.arange(nk), indexing="ij")
        needed = ((jj - off) * bk <= ii * bq + bq - 1) if causal else np.ones_like(ii, bool)
        needed = np.where(jj < off, jj * bk < n_prefix, needed)
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
@pytest.mark.parametrize("causal, segments, dtype, K, n_prefix", [
    (True, True, "bfloat16", 64, 0),
    (False, False, "float32", 48, 0),
    (True, True, "bfloat16", 64, 48),  # a prefix, not a multiple of any block
])
def test_forward_and_backward_lower_for_hardware(platform, variant, causal, segments, dtype, K,
                                                 n_prefix):
    """On any machine: the kernels lower to Triton (CUDA) / Mosaic (TPU) custom calls."""
    B, T, H, G = 2, 1000, 8, 2  # T not a multiple of any block
    q = jax.ShapeDtypeStruct((B, T, H, K), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((B, T, G, K), jnp.dtype(dtype))
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32) if segments else None
    prefix = (jax.ShapeDtypeStruct((B, n_prefix, G, K), jnp.dtype(dtype)),) * 2 if n_prefix else ()

    def loss(q, k, v, seg, *prefix):
        pk, pv = prefix or (None, None)
        out = flash_attention(q, k, v, causal=causal, segment_ids=seg, prefix_k=pk, prefix_v=pv,
                              impl="pallas", interpret=False, platform=variant)
        return out.astype(jnp.float32).sum()

    argnums = (0, 1, 2, 4, 5) if n_prefix else (0, 1, 2)
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    text = fwd_bwd.trace(q, kv, kv, seg, *prefix).lower(lowering_platforms=(platform,)).as_text()
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


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_bad_prefix_arguments_raise(impl):
    """A prefix comes as both ``prefix_k`` and ``prefix_v``, shaped ``[B, S_p >= 1, G, K]`` like
    k, in k's dtype; anything else is a ValueError that names the argument."""
    (q, k, v, _), _ = _inputs("causal-gqa2-ragged-f32")  # q [2, 100, 4, 32], k [2, 100, 2, 32]
    pk = k[:, :6]

    def call(**prefix):
        return jax.eval_shape(lambda: flash_attention(q, k, v, impl=impl, **prefix))

    with pytest.raises(ValueError, match="prefix_k was given without prefix_v"):
        call(prefix_k=pk)
    with pytest.raises(ValueError, match="prefix_v was given without prefix_k"):
        call(prefix_v=pk)
    bad = {"B": pk[:1], "G": pk[:, :, :1], "K": pk[..., :16], "rank": pk[0], "S_p": pk[:, :0]}
    for x in bad.values():  # by what does not fit
        with pytest.raises(ValueError, match=r"prefix_k of shape .* must be \[B, S_p, G, K\]"):
            call(prefix_k=x, prefix_v=x)
        with pytest.raises(ValueError, match="prefix_v of shape"):
            call(prefix_k=pk, prefix_v=x)
    with pytest.raises(ValueError, match="prefix_v of shape .* differs from prefix_k"):
        call(prefix_k=pk, prefix_v=k[:, :5])
    with pytest.raises(ValueError, match="prefix_k dtype bfloat16 differs from k's float32"):
        call(prefix_k=pk.astype(jnp.bfloat16), prefix_v=pk)


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
