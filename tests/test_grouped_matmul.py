"""Grouped-matmul kernel ≡ ``jax.lax.ragged_dot`` (values, d-lhs and d-rhs) over group-size
patterns — empty groups first, in the middle and last, one group, boundaries inside tiles, fewer
rows than M —, the group metadata's invariants, the impl switch, and lowering for CUDA and TPU.

On CPU both kernel variants run in Pallas's interpreter; the same class runs compiled on a GPU
(``-m gpu``) or TPU when one is present.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import GMM_BF16, GMM_F32

from pallas_kernels.grouped_matmul import gmm_reference, grouped_matmul, tgmm_reference
from pallas_kernels.grouped_matmul import kernel as gmm_kernel
from pallas_kernels.grouped_matmul import ops as gmm_ops

M, K, N = 64, 32, 48  # four row tiles of 16; K, N two and three tiles
TILE = 16
#: Group sizes (E = len). Boundaries at 20, 41, 13 ... fall inside row tiles.
CASES = {
    "empty-first": [0, 20, 21, 23],
    "empty-middle": [13, 0, 0, 51],
    "empty-last": [30, 34, 0, 0],
    "single-group": [64],
    "tile-aligned": [16, 32, 0, 16],
    "short-rows": [5, 0, 17, 9],            # 31 rows of 64: the rest give zeros
    "many-groups-one-tile": [3, 2, 0, 4, 1, 6],  # six groups inside the first tile
    "all-empty": [0, 0, 0, 0],
}
BF16_CASES = ["empty-first", "short-rows"]

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


def _tiles(variant, interpret):
    """Tiny tiles interpreted and on the GPU; Mosaic TPU needs 128 (shapes are padded to them)."""
    t = 128 if (variant == "tpu" and not interpret) else TILE
    return dict(block_m=t, block_k=t, block_n=t)


@functools.cache
def _inputs(name, dtype="float32"):
    sizes = CASES[name]
    rng = np.random.default_rng(len(sizes) * 1000 + sum(sizes))
    dt = jnp.dtype(dtype)
    lhs = jnp.asarray(rng.standard_normal((M, K)), dt)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), K, N)), dt)
    dout = jnp.asarray(rng.standard_normal((M, N)), dt)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), dout


def _run(fn, *args):
    """``jax.jit(fn)(*args)``; on CPU compiled without LLVM optimizations (the programs run for
    milliseconds; compiling them is what a test's time goes to)."""
    lowered = jax.jit(fn).lower(*args)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(options)(*args)


def _value_and_grads(gmm, lhs, rhs, sizes, dout, **kw):
    """``(out, d_lhs, d_rhs)`` of ``gmm`` as float32 numpy arrays, one program."""
    def run(lhs, rhs, sizes, dout):
        out, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, **kw), lhs, rhs)
        return (out, *vjp(dout.astype(out.dtype)))

    return [np.asarray(x.astype(jnp.float32)) for x in _run(run, lhs, rhs, sizes, dout)]


def _ragged_dot(lhs, rhs, sizes, **kw):
    return jax.lax.ragged_dot(lhs, rhs, sizes, **kw)


@functools.cache
def _expected(name, dtype="float32"):
    with jax.default_matmul_precision("highest"):  # no TF32 in XLA's float32 dots on GPUs
        return _value_and_grads(_ragged_dot, *_inputs(name, dtype))


@pytest.mark.parametrize("mode", MODES)
class TestGroupedMatmul:
    @pytest.mark.parametrize("name", list(CASES))
    def test_float32_values_and_grads_match_ragged_dot(self, mode, name):
        variant, interpret = mode
        got = _value_and_grads(grouped_matmul, *_inputs(name), impl="pallas", platform=variant,
                               interpret=interpret, **_tiles(variant, interpret))
        for what, g, r in zip(("out", "d_lhs", "d_rhs"), got, _expected(name), strict=True):
            np.testing.assert_allclose(g, r, **GMM_F32, err_msg=f"{what} vs ragged_dot")
        # Exact zeros where no group reaches: rows past sum(sizes) (out, d_lhs), empty groups' d_rhs.
        sizes = np.asarray(CASES[name])
        out, d_lhs, d_rhs = got
        assert np.all(out[sizes.sum():] == 0) and np.all(d_lhs[sizes.sum():] == 0)
        assert np.all(d_rhs[sizes == 0] == 0)

    @pytest.mark.parametrize("name", BF16_CASES)
    def test_bfloat16_values_and_grads_match_ragged_dot(self, mode, name):
        variant, interpret = mode
        args = _inputs(name, "bfloat16")
        out = jax.eval_shape(lambda a, b, s: grouped_matmul(
            a, b, s, impl="pallas", platform=variant, interpret=interpret,
            **_tiles(variant, interpret)), *args[:3])
        assert out.dtype == jnp.bfloat16
        got = _value_and_grads(grouped_matmul, *args, impl="pallas", platform=variant,
                               interpret=interpret, **_tiles(variant, interpret))
        for what, g, r in zip(("out", "d_lhs", "d_rhs"), got, _expected(name, "bfloat16"),
                              strict=True):
            np.testing.assert_allclose(g, r, **GMM_BF16, err_msg=f"{what} vs ragged_dot")

    def test_bfloat16_inputs_float32_output(self, mode):
        """``preferred_element_type=float32``: the float32 sums themselves (bf16 products are exact
        in float32); the gradients come back in bf16."""
        variant, interpret = mode
        args = _inputs("empty-middle", "bfloat16")
        kw = dict(preferred_element_type=jnp.float32)
        got = _value_and_grads(grouped_matmul, *args, impl="pallas", platform=variant,
                               interpret=interpret, **_tiles(variant, interpret), **kw)
        with jax.default_matmul_precision("highest"):
            want = _value_and_grads(_ragged_dot, *args, **kw)
        np.testing.assert_allclose(got[0], want[0], **GMM_F32, err_msg="out vs ragged_dot")
        for what, g, r in zip(("d_lhs", "d_rhs"), got[1:], want[1:], strict=True):
            np.testing.assert_allclose(g, r, **GMM_BF16, err_msg=f"{what} vs ragged_dot")
        grads = jax.eval_shape(jax.grad(
            lambda a, b: grouped_matmul(a, b, args[2], impl="pallas", **kw, platform=variant,
                                        interpret=interpret, **_tiles(variant, interpret)).sum(),
            argnums=(0, 1)), *args[:2])
        assert all(g.dtype == jnp.bfloat16 for g in grads)

    def test_kernel_path_runs(self, mode):
        """The pallas impl really calls its kernels (forward, d-lhs, d-rhs); "xla" calls none."""
        variant, interpret = mode
        lhs, rhs, sizes, _ = _inputs("empty-first")

        def loss(a, b, impl):
            return grouped_matmul(a, b, sizes, impl=impl, platform=variant, interpret=interpret,
                                  **_tiles(variant, interpret)).sum()

        text = str(jax.make_jaxpr(jax.grad(functools.partial(loss, impl="pallas"),
                                           argnums=(0, 1)))(lhs, rhs))
        assert text.count("name=grouped_matmul_gmm") == 2 and "name=grouped_matmul_tgmm" in text
        text = str(jax.make_jaxpr(jax.grad(functools.partial(loss, impl="xla"),
                                           argnums=(0, 1)))(lhs, rhs))
        assert "pallas_call" not in text and "ragged_dot" in text


@pytest.mark.parametrize("name", ["empty-first", "short-rows", "many-groups-one-tile"])
def test_references_match_ragged_dot(name):
    """The jnp oracles are ragged_dot and its rhs gradient (zeros past the groups included)."""
    lhs, rhs, sizes, dout = _inputs(name)
    with jax.default_matmul_precision("highest"):
        out, d_lhs, d_rhs = _expected(name)
        np.testing.assert_allclose(gmm_reference(lhs, rhs, sizes), out, **GMM_F32)
        np.testing.assert_allclose(tgmm_reference(lhs, dout, sizes), d_rhs, **GMM_F32)
        np.testing.assert_allclose(
            gmm_reference(dout, jnp.swapaxes(rhs, 1, 2), sizes), d_lhs, **GMM_F32)


def test_group_sizes_are_data_not_shapes():
    """One compiled program serves every group-size pattern of a shape (a jitted MoE step does
    not recompile when routing changes)."""
    traces = []

    @jax.jit
    def f(lhs, rhs, sizes):
        traces.append(1)
        return grouped_matmul(lhs, rhs, sizes, impl="pallas", block_m=TILE, block_k=TILE,
                              block_n=TILE)

    for name in ("empty-first", "empty-middle", "all-empty"):
        lhs, rhs, sizes, _ = _inputs(name)
        with jax.default_matmul_precision("highest"):
            np.testing.assert_allclose(f(lhs, rhs, sizes), _expected(name)[0], **GMM_F32)
    assert len(traces) == 1


def _metadata(sizes, m, block_m):
    m_pad = -(-m // block_m) * block_m
    meta = gmm_kernel.make_group_metadata(jnp.asarray(sizes, jnp.int32), m=m, m_pad=m_pad,
                                          block_m=block_m)
    return m_pad // block_m, jax.tree.map(np.asarray, meta)


@pytest.mark.parametrize("seed", range(6))
def test_group_metadata_work_list(seed):
    """The work list the TPU grid walks and the ranges the GPU programs loop over, on random group
    sizes (many empty groups, sums below, at and above M). Interpret mode clamps an out-of-range
    block index, so value tests cannot see one; a TPU would DMA out of bounds."""
    rng = np.random.default_rng(seed)
    E, block_m = int(rng.integers(1, 12)), int(rng.choice([8, 16, 128]))
    m = int(rng.integers(1, 300))
    sizes = rng.integers(0, 2 * m // E + 2, E) * (rng.random(E) < 0.6)
    tiles_m, meta = _metadata(sizes, m, block_m)
    ends = np.minimum(np.cumsum(sizes), m)
    starts = np.concatenate([[0], ends[:-1]])
    np.testing.assert_array_equal(meta.offsets, np.concatenate([[0], ends]))

    n = int(meta.num_work[0])
    groups, tiles = meta.work_groups, meta.work_tiles
    assert groups.shape == tiles.shape == (tiles_m + E - 1,) and 1 <= n <= tiles_m + E - 1
    assert groups.min() >= 0 and groups.max() < E and tiles.min() >= 0 and tiles.max() < tiles_m
    # Padding repeats the last entry (no new DMA, same output block).
    assert np.all(groups[n:] == groups[n - 1]) and np.all(tiles[n:] == tiles[n - 1])
    pairs = list(zip(groups[:n].tolist(), tiles[:n].tolist(), strict=True))
    assert len(set(pairs)) == n
    # A staircase: sorted by group and by tile, so output revisits are consecutive either way.
    assert np.all(np.diff(groups[:n]) >= 0) and np.all(np.diff(tiles[:n]) >= 0)
    assert set(tiles[:n]) == set(range(tiles_m))  # gmm zeroes every tile
    assert set(groups[:n]) == set(range(E))       # tgmm writes every group, empty ones as zeros
    for g in range(E):  # every (group, tile) pair that shares rows is listed
        for t in range(tiles_m):
            if starts[g] < ends[g] and starts[g] < (t + 1) * block_m and ends[g] > t * block_m:
                assert (g, t) in pairs, (g, t)
    # GPU gmm: tile t loops over groups lo..hi: every group with rows in the tile, and between
    # them only empty groups (which run no iteration).
    for t in range(tiles_m):
        meets = [g for g in range(E)
                 if starts[g] < ends[g] and starts[g] < (t + 1) * block_m and ends[g] > t * block_m]
        lo, hi = int(meta.tile_group_lo[t]), int(meta.tile_group_hi[t])
        if meets:
            assert lo == meets[0] and hi >= meets[-1] and hi < E
            assert all(g in meets or starts[g] == ends[g] for g in range(lo, hi + 1))
        else:
            assert lo > hi


def test_auto_impl_is_xla_until_validated(monkeypatch):
    """``impl="auto"`` follows pallas_kernels._policy: ragged_dot until the kernel's compiled tests
    are recorded for a platform (also while _policy keeps no record for this kernel at all)."""
    from pallas_kernels import _policy

    lhs, rhs, sizes, _ = _inputs("empty-first")
    monkeypatch.delitem(_policy.VALIDATED, "grouped_matmul", raising=False)
    for platform in _policy.PLATFORMS:
        assert gmm_ops.resolve_impl("auto", platform) == "xla"
        assert gmm_ops.resolve_impl("pallas", platform) == "pallas"
    text = str(jax.make_jaxpr(lambda a, b: grouped_matmul(a, b, sizes))(lhs, rhs))
    assert "pallas_call" not in text and "ragged_dot" in text

    monkeypatch.setitem(_policy.VALIDATED, "grouped_matmul", {})
    assert all(gmm_ops.resolve_impl("auto", p) == "xla" for p in _policy.PLATFORMS)
    for where in ("gpu", "tpu"):
        with monkeypatch.context() as m:
            m.setitem(_policy.VALIDATED["grouped_matmul"], where, (jax.__version__, "2026-11-20"))
            for platform in _policy.PLATFORMS:
                assert gmm_ops.resolve_impl("auto", platform) == (
                    "pallas" if platform == where else "xla")
    # The public function follows the record on the default backend (the kernel runs interpreted
    # when the CPU itself is recorded, which only this test does).
    monkeypatch.setitem(_policy.VALIDATED["grouped_matmul"], jax.default_backend(),
                        (jax.__version__, "2026-11-20"))
    text = str(jax.make_jaxpr(lambda a, b: grouped_matmul(a, b, sizes))(lhs, rhs))
    assert "pallas_call" in text


@pytest.mark.parametrize("platform, variant", [("cuda", "gpu"), ("tpu", "tpu")])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_forward_and_backward_export_for_hardware(platform, variant, dtype):
    """On any machine: ``jax.export`` of the forward and of forward + both gradients for CUDA
    (Triton custom calls) and TPU (Mosaic custom calls), at a shape no tile divides. Triton IR is
    not among jax.export's stable custom-call targets (its format is not guaranteed across
    versions), so the CUDA export names it as an accepted exception."""
    E, M_, K_, N_ = 8, 1000, 200, 300
    lhs = jax.ShapeDtypeStruct((M_, K_), jnp.dtype(dtype))
    rhs = jax.ShapeDtypeStruct((E, K_, N_), jnp.dtype(dtype))
    sizes = jax.ShapeDtypeStruct((E,), jnp.int32)

    def fwd(a, b, s):
        return grouped_matmul(a, b, s, impl="pallas", interpret=False, platform=variant)

    def loss(a, b, s):
        return fwd(a, b, s).astype(jnp.float32).sum()

    target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    checks = ([jax.export.DisabledSafetyCheck.custom_call(target)] if platform == "cuda" else [])
    for fn, kernels in ((fwd, 1), (jax.value_and_grad(loss, argnums=(0, 1)), 3)):
        exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                     disabled_checks=checks)(lhs, rhs, sizes)
        assert exported.platforms == (platform,)
        assert exported.mlir_module().count(f"custom_call @{target}") == kernels


@pytest.mark.parametrize("interpret", [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="tpu-compiled", marks=pytest.mark.skipif(not ON_TPU, reason="needs a TPU"))])
def test_matches_megablox(interpret):
    """jax's own TPU kernel (megablox ``gmm`` with its custom_vjp), interpreted on CPU or compiled
    on a TPU: the same values and gradients as the TPU variant here. megablox leaves rows past the
    last group unwritten, so the groups fill M in this case."""
    from jax.experimental.pallas.ops.tpu import megablox

    rng = np.random.default_rng(0)
    m, k, n = 512, 256, 384
    sizes = jnp.asarray([0, 100, 37, 0, 200, 75, 100, 0], jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((sizes.shape[0], k, n)), jnp.bfloat16)
    dout = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    tiles = dict(block_m=128, block_k=128, block_n=128)  # megablox's default tiling
    got = _value_and_grads(grouped_matmul, lhs, rhs, sizes, dout, impl="pallas", platform="tpu",
                           interpret=interpret, **tiles)
    want = _value_and_grads(
        lambda a, b, s: megablox.gmm(a, b, s, preferred_element_type=jnp.bfloat16,
                                     interpret=interpret), lhs, rhs, sizes, dout)
    for what, g, r in zip(("out", "d_lhs", "d_rhs"), got, want, strict=True):
        np.testing.assert_allclose(g, r, **GMM_BF16, err_msg=f"{what} vs megablox")


def test_bad_tiles_and_arguments_raise():
    lhs, rhs, sizes, _ = _inputs("empty-first")
    with pytest.raises(ValueError, match="power of two"):
        jax.eval_shape(lambda: grouped_matmul(lhs, rhs, sizes, impl="pallas", interpret=False,
                                              platform="gpu", block_m=48))
    with pytest.raises(ValueError, match="multiple of 128"):
        jax.eval_shape(lambda: grouped_matmul(lhs, rhs, sizes, impl="pallas", interpret=False,
                                              platform="tpu", block_n=64))
    with pytest.raises(ValueError, match="multiple of 8"):
        grouped_matmul(lhs, rhs, sizes, impl="pallas", block_k=12)
    with pytest.raises(ValueError, match="impl must be one of"):
        grouped_matmul(lhs, rhs, sizes, impl="megablox")
    with pytest.raises(ValueError, match="platform must be one of"):
        grouped_matmul(lhs, rhs, sizes, impl="pallas", platform="cpu")
    with pytest.raises(ValueError, match=r"expected lhs \[M, K\] and rhs \[E, K, N\]"):
        grouped_matmul(lhs[:, :5], rhs, sizes)
    with pytest.raises(ValueError, match=r"group_sizes must be an integer array of shape \(4,\)"):
        grouped_matmul(lhs, rhs, sizes[:3])
    with pytest.raises(ValueError, match="group_sizes must be an integer"):
        grouped_matmul(lhs, rhs, sizes.astype(jnp.float32))
    assert set(gmm_ops.DEFAULT_TILES) == {"cpu", "gpu", "tpu"}
