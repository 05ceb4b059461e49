"""Pallas selective-scan kernels, forward and backward: Mosaic GPU, Mosaic TPU and interpret mode.

Work decomposition (both directions): the grid is ``(batch, channel blocks, time chunks)``.
Channel blocks of ``block_d`` channels run in parallel; time runs sequentially, ``chunk`` steps per
grid step, with the state ``h`` (``block_d × N``, float32) kept on-chip in a scratch buffer across
chunks.

* Forward: ``h_t = exp(Δ'_t A) h_{t-1} + Δ'_t u_t B_t``, ``y_t = C_t·h_t (+ D u_t) (· silu(z_t))``.
  Besides ``out`` it writes only the state at the *start* of every chunk (``hs``) and the last one.
* Backward: chunks are visited in reverse. Each chunk first recomputes its states from the saved
  chunk-start state into an on-chip ``[chunk + 1, state]`` buffer, then runs the adjoint recurrence
  ``dh_{t-1} = exp(Δ'_t A) ⊙ (dh_t + C_t dy_t)`` backwards through it, emitting ``du, dΔ, dz``
  and the per-step ``dB, dC`` (partial over channel blocks), and accumulating ``dA, dD,
  d(delta_bias)`` per (batch, channel block). Never more than one chunk of states is held; nothing
  of size ``T × N × D`` is stored.

State orientation. The outer products ``Δ'u ⊗ B`` need one operand as a row and one as a column.

* ``"nd"`` (Mosaic TPU, and the default in interpret mode): state ``[N, block_d]``, channels on the
  128 lanes, ``N`` on sublanes; per-step ``B_t``/``C_t`` rows are reshaped to ``[N, 1]`` columns.
* ``"dn"`` (Mosaic GPU): state ``[block_d, N]`` in the WGMMA register layout (``block_d % 64 == 0``,
  ``N % 8 == 0``); per-channel vectors use its row layout and per-state vectors its column layout,
  set explicitly with ``plgpu.load(..., layout=...)`` because Mosaic GPU cannot infer them.

GPU backend: Mosaic GPU (``plgpu.CompilerParams``), the current Pallas GPU backend — on the
installed JAX a ``pallas_call`` without compiler params already lowers to Mosaic GPU, and Triton
must be asked for. Mosaic GPU needs sm90+ (H100). The kernel uses ``pl.pallas_call`` with a
``"sequential"`` time axis, which this JAX marks as deprecated for Mosaic GPU in favour of
``plgpu.kernel`` + ``plgpu.emit_pipeline``; it lowers today and keeps one kernel body for every
backend. Lowering for ``cuda`` and ``tpu`` is checked on CPU in the tests; the kernels have run only
in interpret mode so far (not compiled or run on a GPU or TPU).

Inputs are taken in any float dtype; all arithmetic and the state are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Array = jax.Array

#: Per-backend defaults: (chunk, block_d). GPU: 64 channels = one WGMMA row tile per warpgroup; the
#: backward's ``[chunk + 1, 64, N]`` float32 state buffer and its I/O blocks must fit in shared
#: memory, so the default chunk is the longest multiple of 8 up to 32 that fits
#: (:func:`gpu_backward_smem_bytes`): 24 steps for float32 inputs at N 16, 32 for bfloat16. TPU:
#: 512 lanes give the VPU independent work per step; the buffer (65 × 16 × 512 × 4 B = 2.1 MB) sits
#: in VMEM. On GPU the forward double-buffers its input blocks, the backward (its state buffer takes
#: most of shared memory) does not. Untuned: no accelerator has run these yet.
DEFAULTS = {"mosaic_gpu": (32, 64), "tpu": (64, 512), "interpret": (64, 512)}
#: Shared memory one GPU block may use (Hopper: 227 KB, the limit Mosaic GPU checks while lowering
#: when no GPU is attached) and a margin kept free of it; the default chunk is planned to fit.
GPU_SMEM_BYTES, GPU_SMEM_MARGIN = 227 * 1024, 4096
GPU_SMEM_BUDGET = GPU_SMEM_BYTES - GPU_SMEM_MARGIN
#: Mosaic GPU copies a block only if its bytes are a multiple of the warpgroup size (128 threads):
#: the float32 reset flags travel as one row of a multiple of 32 per chunk, padded past the chunk.
GPU_COPY_BYTES = 128
#: Mosaic GPU's shared-memory accounting (jax 0.10.2): every buffer starts on a 1024-byte boundary;
#: a kernel also reserves ``reduction_scratch_bytes`` (``plgpu.CompilerParams``'s default, 2 KB)
#: and an 8-byte barrier (the backward's one pipeline slot).
GPU_SMEM_ALIGN, GPU_REDUCTION_SCRATCH, GPU_BARRIER_BYTES = 1024, 128 * 4 * 4, 8


def gpu_backward_smem_bytes(*, chunk: int, block_d: int, n: int, itemsize: int, has_z: bool,
                            has_d: bool, has_bias: bool, has_reset: bool) -> int:
    """Shared memory of the Mosaic GPU backward kernel (one buffer per operand, as it runs with
    ``max_concurrent_steps=1``), counted as Mosaic GPU counts it. ``n``: the padded state size;
    ``itemsize``: bytes per element of ``u``/``delta``/``z``/``B``/``C`` and their gradients.

    Mirrors :func:`backward`'s operands; it matched Mosaic GPU's own count exactly at every shape
    tried (chunks 8-32, N 4-64, float32 and bfloat16, with and without z, D, Δ bias and resets), and
    the tests check that it brackets the limit where lowering starts to fail."""
    def buf(*shape, size=4):
        return _round_up(size * math.prod(shape), GPU_SMEM_ALIGN)

    k, bd = chunk, block_d
    chan, stat, state, vec = buf(k, bd, size=itemsize), buf(k, n, size=itemsize), buf(bd, n), buf(bd)
    n_chan = 3 + 2 + 2 * has_z                     # dout, u, delta (+ z); du, ddelta (+ dz)
    total = (n_chan * chan + 2 * stat              # B, C
             + state * 3                           # A, hs, dlast
             + (has_d + has_bias) * vec            # D, delta_bias
             + (buf(_keep_row(k)) if has_reset else 0)
             + state + 2 * buf(k, n)               # dA; dB, dC partials (float32)
             + (has_d + has_bias) * vec            # dD, d(delta_bias) partials
             + buf(k + 1, bd, n) + 2 * state       # scratch: chunk states, dh, dA accumulator
             + (has_d + has_bias) * vec)           # dD, d(delta_bias) accumulators
    return total + _round_up(GPU_REDUCTION_SCRATCH, GPU_SMEM_ALIGN) + GPU_BARRIER_BYTES


def _keep_row(k: int) -> int:
    """Length of the per-chunk row of reset flags (float32) on Mosaic GPU."""
    return _round_up(k, GPU_COPY_BYTES // 4)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape of one kernel launch (hashable: it is a ``custom_vjp`` non-diff argument)."""

    backend: str            # "mosaic_gpu" | "tpu" | "interpret"
    orientation: str        # "nd" | "dn"
    chunk: int              # time steps per grid step (K)
    block_d: int            # channels per block
    seq_len: int            # true T (the arrays are padded to a multiple of chunk)
    has_z: bool
    has_d: bool
    has_bias: bool
    has_reset: bool
    softplus: bool

    @property
    def annotate(self) -> bool:
        return self.backend == "mosaic_gpu"


def plan_for(backend: str, *, seq_len: int, d: int, n: int, chunk: int | None,
             block_d: int | None, orientation: str | None, has_z: bool, has_d: bool,
             has_bias: bool, has_reset: bool, softplus: bool,
             itemsize: int = 4) -> tuple[Plan, int, int, int]:
    """A plan and the padded ``(T, D, N)`` the arrays must have for it. ``itemsize``: bytes per
    element of the inputs (the GPU default chunk is the longest whose backward fits shared memory)."""
    default_chunk, default_block = DEFAULTS[backend]
    block_d = block_d or default_block
    if chunk is None and backend == "mosaic_gpu":
        # The longest chunk (a multiple of 8) whose backward fits shared memory.
        def smem(k):
            return gpu_backward_smem_bytes(chunk=k, block_d=block_d, n=_round_up(n, 8),
                                           itemsize=itemsize, has_z=has_z, has_d=has_d,
                                           has_bias=has_bias, has_reset=has_reset)
        fits = default_chunk // 8 * 8
        while fits >= 8 and smem(fits) > GPU_SMEM_BUDGET:
            fits -= 8
        if fits < 8:
            need = smem(8)
            raise ValueError(
                f"selective_scan on Mosaic GPU: the backward of an 8-step chunk of {block_d} "
                f"channels with N={n} and {itemsize}-byte inputs needs ~{need:,} B of shared "
                f"memory (> {GPU_SMEM_BUDGET:,}); use bfloat16 inputs, a smaller N, or "
                "impl='xla'")
        chunk = fits
    chunk = chunk or default_chunk
    if orientation is None:
        orientation = "dn" if backend == "mosaic_gpu" else "nd"
    if orientation not in ("nd", "dn"):
        raise ValueError(f"orientation must be 'nd' or 'dn' (got {orientation!r})")
    if backend == "mosaic_gpu":
        if orientation != "dn":
            raise ValueError("the Mosaic GPU kernel uses the 'dn' state orientation")
        if block_d % 64:
            raise ValueError(f"block_d must be a multiple of 64 on Mosaic GPU (got {block_d})")
        chunk = max(8, -(-chunk // 8) * 8)
        d_pad, n_pad = _round_up(d, 64), _round_up(n, 8)
    else:
        d_pad, n_pad = d, n
    if backend == "tpu":  # (16, 128) tiles for bf16 blocks, unless a block spans the whole dim
        chunk = _round_up(chunk, 16)
        if block_d < d and block_d % 128:
            raise ValueError(f"block_d must be a multiple of 128 on TPU (got {block_d})")
    chunk = min(chunk, _round_up(seq_len, 8))
    block_d = min(block_d, d_pad)
    d_pad = _round_up(d_pad, block_d)
    t_pad = _round_up(seq_len, chunk)
    plan = Plan(backend=backend, orientation=orientation, chunk=chunk, block_d=block_d,
                seq_len=seq_len, has_z=has_z, has_d=has_d, has_bias=has_bias,
                has_reset=has_reset, softplus=softplus)
    return plan, t_pad, d_pad, n_pad


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# --------------------------------------------------------------------------------------------------
# State orientations: how per-channel vectors, per-state vectors and states are loaded, broadcast,
# reduced and laid out in HBM. Kernel bodies are written once against this interface.


class _ND:
    """State ``[N, bd]``: per-channel vectors ``[1, bd]``, per-state vectors ``[N, 1]``."""

    def __init__(self, n: int, bd: int):
        self.n, self.bd = n, bd
        self.state = (n, bd)
        self.chan_shape = (1, bd)

    # loads and stores inside the kernel
    def chan(self, ref, t):
        return ref[pl.ds(t, 1), :].astype(jnp.float32)

    def put_chan(self, ref, t, v):
        ref[pl.ds(t, 1), :] = v.astype(ref.dtype)

    def stat(self, ref, t):
        return ref[pl.ds(t, 1), :].astype(jnp.float32).reshape(self.n, 1)

    def put_stat(self, ref, t, v):
        ref[pl.ds(t, 1), :] = v.reshape(1, self.n).astype(ref.dtype)

    def scalar(self, ref, t):
        return ref[pl.ds(t, 1), :].astype(jnp.float32)            # [1, 1]

    def load(self, ref, idx=(), what="state"):
        return ref[idx] if idx != () else ref[...]

    def zeros(self, what):
        return jnp.zeros(self.state if what == "state" else self.chan_shape, jnp.float32)

    # broadcasting and reductions
    def bc_chan(self, v):
        return v

    def bc_stat(self, v):
        return v

    def sum_n(self, x):
        return jnp.sum(x, axis=0, keepdims=True)

    def sum_d(self, x):
        return jnp.sum(x, axis=1, keepdims=True)

    # HBM layouts and block specs (grid indices b, j, chunk)
    def a_array(self, A):                   # A [D, N] -> [N, D]
        return A.T

    def a_spec(self):
        return pl.BlockSpec((self.n, self.bd), lambda b, j, c: (0, j))

    def param_array(self, v):               # [D] -> [1, D]
        return v.reshape(1, -1)

    def param_spec(self):
        return pl.BlockSpec((1, self.bd), lambda b, j, c: (0, j))

    def keep_array(self, keep, k):          # [B, T] -> [B, T, 1]
        return keep[:, :, None]

    def keep_spec(self, k, tmap):
        return pl.BlockSpec((None, k, 1), lambda b, j, c: (b, tmap(c), 0))

    def states_shape(self, lead: tuple[int, ...], d: int):
        return (*lead, self.n, d)

    def state_spec(self, lead_map):
        return pl.BlockSpec((*[None] * len(lead_map((0, 0, 0))), self.n, self.bd),
                            lambda b, j, c: (*lead_map((b, j, c)), 0, j))

    def to_bdn(self, s):                    # [B, N, D] -> [B, D, N]
        return jnp.swapaxes(s, -1, -2)

    def from_bdn(self, s):
        return jnp.swapaxes(s, -1, -2)

    def chan_partial_shape(self, batch: int, d: int):
        return (batch, 1, d)

    def chan_partial_spec(self):
        return pl.BlockSpec((None, 1, self.bd), lambda b, j, c: (b, 0, j))


class _DN:
    """State ``[bd, N]``: per-channel vectors ``[bd]``, per-state vectors ``[N]``.

    With ``annotate`` (Mosaic GPU) every load names its register layout: the state the WGMMA layout,
    per-channel vectors its row reduction, per-state vectors its column reduction.
    """

    def __init__(self, n: int, bd: int, annotate: bool):
        self.n, self.bd, self.annotate = n, bd, annotate
        self.state = (bd, n)
        self.chan_shape = (bd,)
        if annotate:
            from jax.experimental.pallas import mosaic_gpu as plgpu
            self._plgpu = plgpu
            wg = plgpu.Layout.WGMMA
            self._layouts = {"state": wg, "chan": wg.reduce(1), "stat": wg.reduce(0)}

    def _load(self, ref, idx, what):
        if self.annotate:
            return self._plgpu.load(ref, idx, layout=self._layouts[what])
        return ref[idx] if idx != () else ref[...]

    def chan(self, ref, t):
        return self._load(ref, (t,), "chan").astype(jnp.float32)

    def put_chan(self, ref, t, v):
        ref[t] = v.astype(ref.dtype)

    def stat(self, ref, t):
        return self._load(ref, (t,), "stat").astype(jnp.float32)

    def put_stat(self, ref, t, v):
        ref[t] = v.astype(ref.dtype)

    def scalar(self, ref, t):
        return ref[t].astype(jnp.float32)

    def load(self, ref, idx=(), what="state"):
        return self._load(ref, idx, what)

    def zeros(self, what):
        x = jnp.zeros(self.state if what == "state" else self.chan_shape, jnp.float32)
        return self._plgpu.layout_cast(x, self._layouts[what]) if self.annotate else x

    def bc_chan(self, v):
        return lax.broadcast_in_dim(v, self.state, (0,))

    def bc_stat(self, v):
        return lax.broadcast_in_dim(v, self.state, (1,))

    def sum_n(self, x):
        return jnp.sum(x, axis=1)

    def sum_d(self, x):
        return jnp.sum(x, axis=0)

    def a_array(self, A):
        return A

    def a_spec(self):
        return pl.BlockSpec((self.bd, self.n), lambda b, j, c: (j, 0))

    def param_array(self, v):
        return v

    def param_spec(self):
        return pl.BlockSpec((self.bd,), lambda b, j, c: (j,))

    def keep_array(self, keep, k):          # [B, T] -> [B, T / k, KEEP_ROW]: one row per chunk
        batch, t_pad = keep.shape
        rows = keep.reshape(batch, t_pad // k, k)
        return jnp.pad(rows, ((0, 0), (0, 0), (0, _keep_row(k) - k)), constant_values=1.0)

    def keep_spec(self, k, tmap):
        return pl.BlockSpec((None, None, _keep_row(k)), lambda b, j, c: (b, tmap(c), 0))

    def states_shape(self, lead: tuple[int, ...], d: int):
        return (*lead, d, self.n)

    def state_spec(self, lead_map):
        return pl.BlockSpec((*[None] * len(lead_map((0, 0, 0))), self.bd, self.n),
                            lambda b, j, c: (*lead_map((b, j, c)), j, 0))

    def to_bdn(self, s):
        return s

    def from_bdn(self, s):
        return s

    def chan_partial_shape(self, batch: int, d: int):
        return (batch, d)

    def chan_partial_spec(self):
        return pl.BlockSpec((None, self.bd), lambda b, j, c: (b, j))


def orientation(plan: Plan, n: int):
    if plan.orientation == "nd":
        return _ND(n, plan.block_d)
    return _DN(n, plan.block_d, plan.annotate)


# --------------------------------------------------------------------------------------------------
# Kernel bodies


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _softplus(x, plan: Plan):
    """torch's softplus (threshold 20); Mosaic GPU has no log1p, so ``log(1 + e^x)`` there."""
    e = jnp.exp(jnp.minimum(x, 20.0))
    sp = jnp.log(1.0 + e) if plan.annotate else jnp.log1p(e)
    return jnp.where(x <= 20.0, sp, x)


def _delta(plan: Plan, lay, dt_ref, t, bias, valid):
    """``(Δ + bias, Δ')`` at step ``t``; Δ' is zero on padded steps: they leave the state alone."""
    raw = lay.chan(dt_ref, t)
    if plan.has_bias:
        raw = raw + bias
    dtp = _softplus(raw, plan) if plan.softplus else raw
    if valid is not None:
        dtp = dtp * valid
    return raw, dtp


def _valid(plan: Plan, chunk_idx, t):
    """1.0 on real steps, 0.0 on padding; ``None`` when T is a multiple of the chunk."""
    if plan.seq_len % plan.chunk == 0:
        return None
    return (chunk_idx * plan.chunk + t < plan.seq_len).astype(jnp.float32)


def _unpack(refs, plan: Plan, names):
    """Name the positional refs; optional operands appear only when present."""
    present = {"z": plan.has_z, "d": plan.has_d, "bias": plan.has_bias, "keep": plan.has_reset,
               "dz": plan.has_z, "dd": plan.has_d, "dbias": plan.has_bias,
               "dd_acc": plan.has_d, "dbias_acc": plan.has_bias}
    it = iter(refs)
    out = {name: next(it) if present.get(name, True) else None for name in names}
    assert next(it, None) is None
    return out


FWD_NAMES = ("u", "dt", "z", "a", "b", "c", "d", "bias", "keep",      # inputs
             "out", "hs", "last",                                     # outputs
             "h")                                                     # scratch


def _fwd_kernel(*refs, plan: Plan, lay):
    r = _unpack(refs, plan, FWD_NAMES)
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        r["h"][...] = lay.zeros("state")

    h0 = lay.load(r["h"])
    r["hs"][...] = h0
    A = lay.load(r["a"]).astype(jnp.float32)
    dvec = lay.load(r["d"], what="chan").astype(jnp.float32) if plan.has_d else None
    bias = lay.load(r["bias"], what="chan").astype(jnp.float32) if plan.has_bias else None

    def step(t, h):
        _, dtp = _delta(plan, lay, r["dt"], t, bias, _valid(plan, c, t))
        u = lay.chan(r["u"], t)
        decay = jnp.exp(lay.bc_chan(dtp) * A)
        if plan.has_reset:
            decay = decay * lay.scalar(r["keep"], t)
        h = decay * h + lay.bc_chan(dtp * u) * lay.bc_stat(lay.stat(r["b"], t))
        y = lay.sum_n(h * lay.bc_stat(lay.stat(r["c"], t)))
        if plan.has_d:
            y = y + dvec * u
        if plan.has_z:
            zt = lay.chan(r["z"], t)
            y = y * (zt * _sigmoid(zt))
        lay.put_chan(r["out"], t, y)
        return h

    h = lax.fori_loop(0, plan.chunk, step, h0)
    r["h"][...] = h
    r["last"][...] = h


BWD_NAMES = ("dout", "u", "dt", "z", "a", "b", "c", "d", "bias", "keep", "hs", "dlast",   # inputs
             "du", "ddt", "dz", "da", "db", "dc", "dd", "dbias",                         # outputs
             "hbuf", "dh", "da_acc", "dd_acc", "dbias_acc")                              # scratch


def _bwd_kernel(*refs, plan: Plan, lay, n_chunks: int):
    r = _unpack(refs, plan, BWD_NAMES)
    c = pl.program_id(2)
    chunk_idx = n_chunks - 1 - c

    @pl.when(c == 0)
    def _():
        r["dh"][...] = lay.load(r["dlast"])
        r["da_acc"][...] = lay.zeros("state")
        if plan.has_d:
            r["dd_acc"][...] = lay.zeros("chan")
        if plan.has_bias:
            r["dbias_acc"][...] = lay.zeros("chan")

    A = lay.load(r["a"]).astype(jnp.float32)
    dvec = lay.load(r["d"], what="chan").astype(jnp.float32) if plan.has_d else None
    bias = lay.load(r["bias"], what="chan").astype(jnp.float32) if plan.has_bias else None

    def decay_at(t, dtp):
        decay = jnp.exp(lay.bc_chan(dtp) * A)
        if plan.has_reset:
            decay = decay * lay.scalar(r["keep"], t)
        return decay

    # 1) Recompute this chunk's states: hbuf[0] = state before the chunk, hbuf[t + 1] = h_t.
    h0 = lay.load(r["hs"])
    r["hbuf"][0] = h0

    def fwd_step(t, h):
        _, dtp = _delta(plan, lay, r["dt"], t, bias, _valid(plan, chunk_idx, t))
        u = lay.chan(r["u"], t)
        h = decay_at(t, dtp) * h + lay.bc_chan(dtp * u) * lay.bc_stat(lay.stat(r["b"], t))
        r["hbuf"][t + 1] = h
        return h

    lax.fori_loop(0, plan.chunk, fwd_step, h0)

    # 2) The adjoint recurrence, backwards through the chunk.
    def bwd_step(i, carry):
        dh, da, dd, dbias = carry
        t = plan.chunk - 1 - i
        valid = _valid(plan, chunk_idx, t)
        raw, dtp = _delta(plan, lay, r["dt"], t, bias, valid)
        u = lay.chan(r["u"], t)
        bt = lay.bc_stat(lay.stat(r["b"], t))
        ct = lay.bc_stat(lay.stat(r["c"], t))
        h = lay.load(r["hbuf"], (t + 1,))
        h_prev = lay.load(r["hbuf"], (t,))
        dy = lay.chan(r["dout"], t)
        if plan.has_z:
            y = lay.sum_n(ct * h)
            if plan.has_d:
                y = y + dvec * u
            zt = lay.chan(r["z"], t)
            sig = _sigmoid(zt)
            lay.put_chan(r["dz"], t, dy * y * sig * (1.0 + zt * (1.0 - sig)))
            dy = dy * (zt * sig)
        lay.put_stat(r["dc"], t, lay.sum_d(lay.bc_chan(dy) * h))
        dh = dh + ct * lay.bc_chan(dy)
        lay.put_stat(r["db"], t, lay.sum_d(dh * lay.bc_chan(dtp * u)))
        s = lay.sum_n(dh * bt)                       # Σ_n dh B_t
        du = s * dtp
        if plan.has_d:
            du = du + dvec * dy
            dd = dd + dy * u
        lay.put_chan(r["du"], t, du)
        decay = decay_at(t, dtp)
        g = dh * h_prev * decay                      # ∂/∂(Δ'A) of the decay term
        ddtp = lay.sum_n(g * A) + s * u
        da = da + g * lay.bc_chan(dtp)
        if plan.softplus:
            ddtp = ddtp * _sigmoid(raw)
        if valid is not None:
            ddtp = ddtp * valid
        if plan.has_bias:
            dbias = dbias + ddtp
        lay.put_chan(r["ddt"], t, ddtp)
        return dh * decay, da, dd, dbias

    dd0 = lay.load(r["dd_acc"], what="chan") if plan.has_d else jnp.zeros((), jnp.float32)
    db0 = lay.load(r["dbias_acc"], what="chan") if plan.has_bias else jnp.zeros((), jnp.float32)
    dh, da, dd, dbias = lax.fori_loop(
        0, plan.chunk, bwd_step, (lay.load(r["dh"]), lay.load(r["da_acc"]), dd0, db0))
    r["dh"][...] = dh
    r["da_acc"][...] = da
    r["da"][...] = da
    if plan.has_d:
        r["dd_acc"][...] = dd
        r["dd"][...] = dd
    if plan.has_bias:
        r["dbias_acc"][...] = dbias
        r["dbias"][...] = dbias


# --------------------------------------------------------------------------------------------------
# Launchers. Arrays arrive padded: u/delta/z [B, Tp, Dp], B/C [B, Tp, Np], A [Dp, Np], D/bias [Dp],
# keep [B, Tp] float (1 = carry the state, 0 = a new sequence starts).


def _call(kernel, plan: Plan, grid, in_specs, out_specs, out_shape, scratch, *, buffers=1):
    if plan.backend == "mosaic_gpu":
        from jax.experimental.pallas import mosaic_gpu as plgpu
        params = plgpu.CompilerParams(dimension_semantics=("parallel", "parallel", "sequential"),
                                      max_concurrent_steps=buffers)
        scratch = [plgpu.SMEM(s, jnp.float32) for s in scratch]
    else:
        from jax.experimental.pallas import tpu as pltpu
        params = (pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
                  if plan.backend == "tpu" else None)
        scratch = [pltpu.VMEM(s, jnp.float32) for s in scratch]
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, scratch_shapes=scratch, compiler_params=params,
                          interpret=plan.backend == "interpret")


def _operand_specs(plan: Plan, lay, tmap):
    k, bd = plan.chunk, plan.block_d
    chan = pl.BlockSpec((None, k, bd), lambda b, j, c: (b, tmap(c), j))
    stat = pl.BlockSpec((None, k, lay.n), lambda b, j, c: (b, tmap(c), 0))
    return chan, stat


def forward(plan: Plan, u, delta, A, B, C, D, z, delta_bias, keep):
    """``(out [B, Tp, Dp], hs [B, n_chunks, state...], last [B, Dp, Np])``."""
    batch, t_pad, d_pad = u.shape
    n = A.shape[1]
    lay = orientation(plan, n)
    n_chunks, n_blocks = t_pad // plan.chunk, d_pad // plan.block_d
    chan, stat = _operand_specs(plan, lay, lambda c: c)
    args = {"u": (u, chan), "dt": (delta, chan), "z": (z, chan),
            "a": (lay.a_array(A), lay.a_spec()), "b": (B, stat), "c": (C, stat),
            "d": (D, None), "bias": (delta_bias, None), "keep": (keep, None)}
    if plan.has_d:
        args["d"] = (lay.param_array(D), lay.param_spec())
    if plan.has_bias:
        args["bias"] = (lay.param_array(delta_bias), lay.param_spec())
    if plan.has_reset:
        args["keep"] = (lay.keep_array(keep, plan.chunk), lay.keep_spec(plan.chunk, lambda c: c))
    present = [v for v in args.values() if v[0] is not None]
    out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
                 jax.ShapeDtypeStruct(lay.states_shape((batch, n_chunks), d_pad), jnp.float32),
                 jax.ShapeDtypeStruct(lay.states_shape((batch,), d_pad), jnp.float32)]
    out_specs = [chan, lay.state_spec(lambda g: (g[0], g[2])), lay.state_spec(lambda g: (g[0],))]
    call = _call(functools.partial(_fwd_kernel, plan=plan, lay=lay), plan,
                 (batch, n_blocks, n_chunks), [s for _, s in present], out_specs, out_shape,
                 [lay.state], buffers=2)
    out, hs, last = call(*[a for a, _ in present])
    return out, hs, lay.to_bdn(last)


def backward(plan: Plan, dout, dlast, u, delta, A, B, C, D, z, delta_bias, keep, hs):
    """Gradients; ``dA``/``dD``/``d(delta_bias)`` summed over batch, ``dB``/``dC`` over blocks."""
    batch, t_pad, d_pad = u.shape
    n = A.shape[1]
    lay = orientation(plan, n)
    n_chunks, n_blocks = t_pad // plan.chunk, d_pad // plan.block_d

    def rev(c):
        return n_chunks - 1 - c

    chan, stat = _operand_specs(plan, lay, rev)
    args = [(dout, chan), (u, chan), (delta, chan)]
    if plan.has_z:
        args.append((z, chan))
    args += [(lay.a_array(A), lay.a_spec()), (B, stat), (C, stat)]
    if plan.has_d:
        args.append((lay.param_array(D), lay.param_spec()))
    if plan.has_bias:
        args.append((lay.param_array(delta_bias), lay.param_spec()))
    if plan.has_reset:
        args.append((lay.keep_array(keep, plan.chunk), lay.keep_spec(plan.chunk, rev)))
    args += [(hs, lay.state_spec(lambda g: (g[0], rev(g[2])))),
             (lay.from_bdn(dlast), lay.state_spec(lambda g: (g[0],)))]

    k = plan.chunk
    part = pl.BlockSpec((None, None, k, n), lambda b, j, c: (b, j, rev(c), 0))
    part_shape = jax.ShapeDtypeStruct((batch, n_blocks, t_pad, n), jnp.float32)
    outs = [(jax.ShapeDtypeStruct(u.shape, u.dtype), chan),
            (jax.ShapeDtypeStruct(delta.shape, delta.dtype), chan)]
    if plan.has_z:
        outs.append((jax.ShapeDtypeStruct(z.shape, z.dtype), chan))
    outs += [(jax.ShapeDtypeStruct(lay.states_shape((batch,), d_pad), jnp.float32),
              lay.state_spec(lambda g: (g[0],))), (part_shape, part), (part_shape, part)]
    chan_part = (jax.ShapeDtypeStruct(lay.chan_partial_shape(batch, d_pad), jnp.float32),
                 lay.chan_partial_spec())
    if plan.has_d:
        outs.append(chan_part)
    if plan.has_bias:
        outs.append(chan_part)
    scratch = [(k + 1, *lay.state), lay.state, lay.state]
    if plan.has_d:
        scratch.append(lay.chan_shape)
    if plan.has_bias:
        scratch.append(lay.chan_shape)
    call = _call(functools.partial(_bwd_kernel, plan=plan, lay=lay, n_chunks=n_chunks), plan,
                 (batch, n_blocks, n_chunks), [s for _, s in args], [s for _, s in outs],
                 [s for s, _ in outs], scratch)
    res = iter(call(*[a for a, _ in args]))
    du, ddelta = next(res), next(res)
    dz = next(res) if plan.has_z else None
    dA = lay.to_bdn(next(res)).sum(0)
    dB, dC = next(res).sum(1), next(res).sum(1)
    dD = next(res).reshape(batch, d_pad).sum(0) if plan.has_d else None
    dbias = next(res).reshape(batch, d_pad).sum(0) if plan.has_bias else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias
