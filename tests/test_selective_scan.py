"""Selective scan: reference ≡ a naive loop, chunked ≡ reference, Pallas kernel ≡ reference (values
and gradients of every input, interpret mode, both state orientations), lowering for GPU and TPU,
the GPU plan's shared memory.

On CPU the kernels run in Pallas's interpreter; the ``*-compiled`` cases run them compiled on a GPU
(``pytest -m gpu``, Mosaic GPU, sm90+) or a TPU.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import F32_GRAD, F32_REORDER, SCAN_BF16, SCAN_GRAD

from pallas_kernels import selective_scan
from pallas_kernels.selective_scan import kernel, ops, selective_scan_chunked, selective_scan_ref

B, T, D, N = 2, 70, 16, 8          # T is not a multiple of CHUNK: the last chunk is padded
CHUNK, BLOCK_D = 16, 8             # two channel blocks: dB, dC are summed over blocks
DIFF = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

ON_GPU = jax.default_backend() == "gpu"
ON_TPU = jax.default_backend() == "tpu"
#: Kernel options per mode: interpreted (CPU), or compiled on the hardware at hand with its default
#: channel block (Mosaic GPU needs multiples of 64; the interpreted cases split D=16 in two blocks).
MODES = [
    pytest.param({"block_d": BLOCK_D}, id="interpret"),
    pytest.param({"interpret": False}, id="gpu-compiled",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")]),
    pytest.param({"interpret": False}, id="tpu-compiled",
                 marks=pytest.mark.skipif(not ON_TPU, reason="needs a TPU")),
]

#: Which optional inputs each case passes. The last two are complementary: each option is on in one
#: and off in the other; "full" has them all on together.
CASES = {
    "bare": {},
    "full": dict(D=True, z=True, delta_bias=True, delta_softplus=True, return_last_state=True,
                 reset=True),
    "d_softplus_last": dict(D=True, delta_softplus=True, return_last_state=True),
    "z_bias_reset": dict(z=True, delta_bias=True, reset=True),
}


def make_inputs(seed=0, dtype=jnp.float32):
    """Inputs of every case (numpy-seeded: no per-op compiles), reset flags and loss weights."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    # Raw Δ is signed when softplus follows; without softplus it is the step size itself, > 0 (a
    # negative step makes exp(ΔA) > 1 and the recurrence blow up).
    x = {"u": normal(B, T, D), "delta": normal(B, T, D, scale=0.5),
         "delta_pos": 0.05 + np.abs(normal(B, T, D, scale=0.5)),
         "A": -np.exp(normal(D, N, scale=0.5)), "B": normal(B, T, N), "C": normal(B, T, N),
         "D": normal(D), "z": normal(B, T, D), "delta_bias": np.abs(normal(D, scale=0.3))}
    io = ("u", "delta", "delta_pos", "B", "C", "z")
    x = {k: jnp.asarray(v, dtype if k in io else jnp.float32) for k, v in x.items()}
    reset = rng.random((B, T)) < 0.05
    reset[:, 37] = True
    weights = {"out": jnp.asarray(normal(B, T, D)), "last": jnp.ones((B, D, N))}
    return x, jnp.asarray(reset), weights


def _delta(case, x):
    return x["delta"] if CASES[case].get("delta_softplus") else x["delta_pos"]


def _kwargs(case, x, reset):
    opts = CASES[case]
    kw = {k: x[k] for k in ("D", "z", "delta_bias") if opts.get(k)}
    kw["delta_softplus"] = opts.get("delta_softplus", False)
    kw["return_last_state"] = opts.get("return_last_state", False)
    if opts.get("reset"):
        kw["reset"] = reset
    return kw


def _loss_and_grads(fn, case, x, reset, weights, **fn_kw):
    """Values, and gradients of a weighted sum of (out, last_state) wrt each input the case uses."""
    kw = _kwargs(case, x, reset)
    used = [k for k in DIFF if k in ("u", "delta", "A", "B", "C") or k in kw]

    def loss(d):
        res = fn(d["u"], d["delta"], d["A"], d["B"], d["C"],
                 **{**kw, **{k: d[k] for k in used if k in kw}}, **fn_kw)
        out, last = res if kw["return_last_state"] else (res, None)
        total = jnp.sum(out.astype(jnp.float32) * weights["out"])
        if last is not None:
            total = total + jnp.sum(last * weights["last"])
        return total, (out, last)

    (_, (out, last)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        {k: _delta(case, x) if k == "delta" else x[k] for k in used})
    return out, last, grads


def _naive(x, reset_bt, *, D=False, z=False, delta_bias=False, delta_softplus=False, **_):
    """selective_scan_ref of state-spaces/mamba, transcribed as a float64 numpy loop in its own
    [batch, dim, length] layout."""
    u = np.asarray(x["u"], np.float64).transpose(0, 2, 1)               # b d l
    delta = np.asarray(x["delta" if delta_softplus else "delta_pos"], np.float64).transpose(0, 2, 1)
    A = np.asarray(x["A"], np.float64)
    Bm = np.asarray(x["B"], np.float64).transpose(0, 2, 1)              # b n l
    Cm = np.asarray(x["C"], np.float64).transpose(0, 2, 1)
    if delta_bias:
        delta = delta + np.asarray(x["delta_bias"], np.float64)[:, None]
    if delta_softplus:
        delta = np.where(delta <= 20, np.log1p(np.exp(np.minimum(delta, 20))), delta)
    batch, dim, length = u.shape
    h = np.zeros((batch, dim, A.shape[1]))
    ys = []
    for i in range(length):
        deltaA = np.exp(np.einsum("bd,dn->bdn", delta[:, :, i], A))
        deltaB_u = np.einsum("bd,bn,bd->bdn", delta[:, :, i], Bm[:, :, i], u[:, :, i])
        if reset_bt is not None:
            deltaA = deltaA * (1 - np.asarray(reset_bt, np.float64)[:, i])[:, None, None]
        h = deltaA * h + deltaB_u
        ys.append(np.einsum("bdn,bn->bd", h, Cm[:, :, i]))
    y = np.stack(ys, axis=2)
    out = y if not D else y + u * np.asarray(x["D"], np.float64)[:, None]
    if z:
        zz = np.asarray(x["z"], np.float64).transpose(0, 2, 1)
        out = out * zz / (1 + np.exp(-zz))
    return out.transpose(0, 2, 1), h


@pytest.fixture(scope="module")
def data():
    return make_inputs()


@pytest.fixture(scope="module")
def reference(data):
    """Oracle values and gradients per case, computed once."""
    cache = {}

    def get(case):
        if case not in cache:
            with jax.default_matmul_precision("highest"):  # no TF32 in the oracle on a GPU
                cache[case] = _loss_and_grads(selective_scan_ref, case, *data)
        return cache[case]
    return get


def _assert_close(got, want, grad_tol):
    (out, last, grads), (out0, last0, grads0) = got, want
    np.testing.assert_allclose(out, out0, **F32_REORDER)
    if last0 is not None:
        np.testing.assert_allclose(last, last0, **F32_REORDER)
    assert grads.keys() == grads0.keys()
    for k in grads0:
        np.testing.assert_allclose(grads[k], grads0[k], **grad_tol, err_msg=f"d{k}")


@pytest.mark.parametrize("case", ["full", "bare"])
def test_reference_matches_naive_loop(data, case):
    x, reset, _ = data
    kw = _kwargs(case, x, reset)
    out = selective_scan_ref(x["u"], _delta(case, x), x["A"], x["B"], x["C"], **kw)
    out, last = out if kw["return_last_state"] else (out, None)
    naive_out, naive_last = _naive(x, kw.get("reset"), **CASES[case])
    np.testing.assert_allclose(out, naive_out, **F32_REORDER)
    if last is not None:
        np.testing.assert_allclose(last, naive_last, **F32_REORDER)


def test_chunked_matches_reference(data, reference):
    _assert_close(_loss_and_grads(selective_scan_chunked, "full", *data, chunk=CHUNK),
                  reference("full"), F32_GRAD)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["full", "d_softplus_last", "z_bias_reset"])
def test_kernel_matches_reference(data, reference, case, mode):
    got = _loss_and_grads(selective_scan, case, *data, impl="pallas", chunk=CHUNK, **mode)
    _assert_close(got, reference(case), SCAN_GRAD)


def test_kernel_gpu_orientation_matches_reference(data, reference):
    """The Mosaic GPU kernel's state layout ([channels, state]), run in interpret mode."""
    got = _loss_and_grads(selective_scan, "full", *data, impl="pallas", chunk=CHUNK,
                          orientation="dn", block_d=BLOCK_D)
    _assert_close(got, reference("full"), SCAN_GRAD)


@pytest.mark.parametrize("mode", MODES)
def test_kernel_bfloat16_inputs(mode):
    """bf16 inputs and output, float32 state: the kernel rounds like the reference."""
    x, reset, _ = make_inputs(seed=1, dtype=jnp.bfloat16)
    kw = _kwargs("full", x, reset)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    mode = {k: v for k, v in mode.items() if k != "block_d"}
    out, last = jax.jit(lambda *a: selective_scan(*a, **kw, impl="pallas", chunk=CHUNK,
                                                  **mode))(*args)
    out0, last0 = selective_scan_ref(*args, **kw)
    assert out.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    np.testing.assert_allclose(out.astype(jnp.float32), out0.astype(jnp.float32), **SCAN_BF16)
    np.testing.assert_allclose(last, last0, **F32_REORDER)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("target, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_forward_and_backward_lower_for_accelerators(data, target, platform, dtype):
    """Mosaic GPU / Mosaic TPU lowering of both kernels, checked on CPU (no device needed); in
    float32 the GPU backward's blocks are twice as large and must still fit shared memory."""
    x, reset, _ = data
    kw = _kwargs("full", x, reset)

    def loss(u, delta, A, Bm, Cm):
        out, last = selective_scan(u, delta, A, Bm, Cm, **kw, impl="pallas", target=target)
        return jnp.sum(out) + jnp.sum(last)

    args = [jax.ShapeDtypeStruct(x[k].shape, jnp.dtype(dtype) if k not in ("A",) else jnp.float32)
            for k in ("u", "delta", "A", "B", "C")]
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(
        lowering_platforms=(platform,))
    text = lowered.as_text()
    marker = "custom_call @mosaic_gpu" if target == "gpu" else "custom_call @tpu_custom_call"
    assert text.count(marker) >= 2, f"expected forward and backward {marker} kernels"


def test_impl_switch_and_errors(data):
    x, _, _ = data
    args = (x["u"], x["delta_pos"], x["A"], x["B"], x["C"])
    assert ops.resolve_impl("auto") == "xla"  # CPU: the XLA path; Pallas only in interpret mode
    with pytest.raises(ValueError, match="impl: must be one of"):
        selective_scan(*args, impl="triton")
    with pytest.raises(ValueError, match=r"B must have shape \(2, 70, 8\)"):
        selective_scan(x["u"], x["delta_pos"], x["A"], x["B"][:, :5], x["C"])
    with pytest.raises(ValueError, match="no compiled Pallas kernel for platform 'cpu'"):
        selective_scan(*args, impl="pallas", interpret=False)


@pytest.mark.parametrize("dtype, resets", [("float32", False), ("float32", True),
                                           ("bfloat16", False), ("bfloat16", True)])
def test_gpu_backward_fits_shared_memory_at_mamba_shapes(dtype, resets):
    """A Mamba layer's scan (T 128, 128 channels, N 16, with z, D and Δ bias): the default GPU
    chunk leaves the backward within Hopper's 227 KB of shared memory (Mosaic GPU checks it while
    lowering). float32 with resets — every Mamba training batch — once needed 234,504 B: a chunk
    had to be a multiple of 32 for the reset flags' copies."""
    B, T, F, N = 2, 128, 128, 16
    dt = jnp.dtype(dtype)
    args = [jax.ShapeDtypeStruct(shape, dt) for shape in [(B, T, F), (B, T, F)]] + [
        jax.ShapeDtypeStruct((F, N), jnp.float32)] + [
        jax.ShapeDtypeStruct(shape, dt) for shape in [(B, T, N), (B, T, N), (F,), (B, T, F), (F,)]]
    reset = jax.ShapeDtypeStruct((B, T), jnp.bool_) if resets else None

    def loss(u, delta, A, Bm, Cm, D, z, bias, reset):
        out = selective_scan(u, delta, A, Bm, Cm, D, z, bias, delta_softplus=True, reset=reset,
                             impl="pallas", target="gpu")
        return out.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args, reset).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") >= 2


def _lower_gpu_backward(chunk, *, T=96, F=64, N=16, dtype=jnp.float32):
    """Lower the GPU kernels (all options, resets) at ``chunk``; the error if lowering fails."""
    S = jax.ShapeDtypeStruct
    chan = S((1, T, F), dtype)
    args = (chan, chan, S((F, N), jnp.float32), S((1, T, N), dtype), S((1, T, N), dtype),
            S((F,), jnp.float32), chan, S((F,), jnp.float32), S((1, T), jnp.bool_))

    def loss(u, delta, A, Bm, Cm, D, z, bias, reset):
        return selective_scan(u, delta, A, Bm, Cm, D, z, bias, delta_softplus=True, reset=reset,
                              impl="pallas", target="gpu", chunk=chunk).astype(jnp.float32).sum()
    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(
            lowering_platforms=("cuda",))
    except ValueError as e:
        return str(e)
    return None


def test_gpu_shared_memory_count_brackets_the_lowering_limit():
    """``kernel.gpu_backward_smem_bytes`` (what the GPU plan sizes its chunk by) agrees with Mosaic
    GPU's own count: float32, N 16, every option and resets: 187,400 B at chunk 24 lowers, 234,504
    B at chunk 32 is refused for exceeding 227 KB — so the default chunk is 24."""
    sizes = {k: kernel.gpu_backward_smem_bytes(chunk=k, block_d=64, n=16, itemsize=4, has_z=True,
                                               has_d=True, has_bias=True, has_reset=True)
             for k in (24, 32)}
    assert sizes == {24: 187_400, 32: 234_504}
    assert sizes[24] <= kernel.GPU_SMEM_BUDGET < kernel.GPU_SMEM_BYTES < sizes[32]
    assert _lower_gpu_backward(24) is None
    assert "exceeds available shared memory: smem_bytes=234504" in _lower_gpu_backward(32)
    plan = kernel.plan_for("mosaic_gpu", seq_len=96, d=64, n=16, chunk=None, block_d=None,
                           orientation=None, has_z=True, has_d=True, has_bias=True, has_reset=True,
                           softplus=True, itemsize=4)[0]
    assert plan.chunk == 24


def test_gpu_plan_that_cannot_fit_fails_clearly():
    """N 64 in float32: even an 8-step chunk's backward overflows shared memory."""
    args = [jnp.zeros((2, 128, 128)), jnp.zeros((2, 128, 128)), jnp.zeros((128, 64)),
            jnp.zeros((2, 128, 64)), jnp.zeros((2, 128, 64))]
    with pytest.raises(ValueError, match="needs ~.* B of shared memory .* use bfloat16 inputs"):
        jax.jit(lambda *a: selective_scan(*a, reset=jnp.zeros((2, 128), bool), impl="pallas",
                                          target="gpu")).trace(*args).lower(
            lowering_platforms=("cuda",))
