"""Named numerical tolerances, in one place. Never loosen one to make a test pass."""

#: Two float32 computations of the same math in a different order (scan vs loop, remat, GQA vs MHA).
F32_REORDER = dict(rtol=1e-5, atol=1e-5)
#: Gradients through the same math reordered (accumulates more rounding than forward values).
F32_GRAD = dict(rtol=1e-4, atol=1e-6)
#: analytic flops_per_token vs XLA's cost analysis of the compiled forward pass: XLA also counts
#: elementwise work (norms, softmax, RoPE, activations) that the matmul-FLOP convention excludes.
FLOPS_VS_XLA_RTOL = 0.05
#: A run trained inside a vmapped group vs alone (batched vs plain matmuls; different R).
SWEEP_VMAP_VS_SEQUENTIAL = dict(rtol=1e-5, atol=1e-6)
#: Flash-attention kernel vs the one-shot reference, float32: the same math with the softmax sum
#: blocked and rescaled online (values and gradients are O(1), hence the absolute floor).
FLASH_F32 = dict(rtol=1e-5, atol=1e-5)
#: Flash-attention kernel vs the reference, bfloat16 inputs and outputs: two bf16 ulps (2^-6).
FLASH_BF16 = dict(rtol=1.6e-2, atol=1.6e-2)
#: Per-step losses of 20 float32 training steps, flash-attention kernel vs XLA attention.
FLASH_TRAIN_LOSS = dict(rtol=1e-5, atol=1e-6)
#: Selective-scan kernel vs the lax.scan oracle, float32 gradients. The kernel accumulates the
#: adjoint in another order (per-chunk recompute, per-block partial sums); dA, dD and d(delta_bias)
#: are sums of B·T terms of size up to ~20 that can cancel to ~1e-2, leaving ~1e-5 of absolute
#: rounding.
SCAN_GRAD = dict(rtol=1e-4, atol=5e-5)
#: Selective scan with bfloat16 inputs and output (float32 state) vs the reference on the same
#: inputs: both round one float32 result to bf16, so they may differ by one bf16 ulp (2^-8).
SCAN_BF16 = dict(rtol=8e-3, atol=8e-3)
#: Logged losses of 20 float32 training steps, selective-scan kernel vs the XLA scan.
SCAN_TRAIN_LOSS = dict(rtol=1e-5, atol=1e-6)

#: float32 values computed two ways from the same formula (an init, a learning-rate schedule vs its
#: closed form in float64): a few float32 ulps.
F32_FORMULA_RTOL = 1e-6
#: bfloat16 compute vs float32 on the micro transformer's logits (O(1) values, bf16's 8-bit mantissa
#: through two layers; measured max |diff| 0.046).
BF16_VS_F32_LOGITS_ATOL = 0.1

# --- scaling-law fitting (tests/test_laws.py) -------------------------------------------------------
#: The same float64 quantity computed two ways (a closed form vs its definition): round-off only.
F64_IDENTITY_RTOL = 1e-12
#: Approach 2's fitted power law at the budgets vs the minima it was fitted through (three points of
#: an exact power law in log-log: round-off of the least-squares solve).
ISOFLOP_POWER_LAW_THROUGH_MINIMA_RTOL = 1e-6
#: Epoch AI's Chinchilla fit E = 1.8172, α = 0.3478, β = 0.3658: reproduced within 0.01 (issue 4).
EPOCH_FIT_ATOL = 0.01
#: A and B lie in a flat valley: Epoch report 482/2085, the same protocol also lands at 478/2143.
EPOCH_AB_VALLEY_RTOL = 0.03
#: ParScale's published fits (3 significant digits): every parameter within 2 % (issue 4).
PARSCALE_PARAM_RTOL = 0.02
#: ParScale's published R² (0.998 / 0.9987) are rounded to 3–4 decimals.
PARSCALE_R2_ATOL = 5e-4
#: "Objective no worse than scipy's": float64 sums in a different order (numpy vs XLA) differ by a
#: few ulps of the ~240 summed terms, nothing more.
OBJECTIVE_VS_SCIPY_RTOL = 1e-9
#: Closed-form gradients/Hessians of log-sum-exp laws vs JAX autodiff, both float64.
F64_DERIVATIVES = dict(rtol=1e-8, atol=1e-12)
#: Numerical N_opt(C) (a log grid refined to ~1e-4 decades) vs the closed form under C = 6ND.
ALLOCATION_NUMERIC_RTOL = 1e-3
#: Recovery of a known Chinchilla law from 240 points with 0.3 % multiplicative noise: E, α, β are
#: well determined; A and B only loosely (they trade off along the loss valley).
RECOVERY_E_RTOL, RECOVERY_EXPONENT_ATOL, RECOVERY_AB_RTOL = 0.02, 0.02, 0.25
#: Approach 2 on noise-free IsoFLOP profiles of a Chinchilla law sampled ±4× around the optimum:
#: exponents exact up to round-off; each parabola's minimum within 3 % of the true N_opt (the
#: profile is not exactly a parabola in log N).
ISOFLOP_EXPONENT_ATOL, ISOFLOP_MINIMUM_RTOL = 1e-6, 0.03

#: A bootstrap resample's refit vs a full 4,500-start refit of the same resample (same data, same
#: float64 objective summed in another order: weights vs repeated rows). Measured on the degenerate
#: 15-run set of tests/test_laws.py: never worse by more than 2e-14 (of 300 resamples checked).
BOOTSTRAP_VS_FULL_REFIT_RTOL = 1e-9
#: Approach 3's compute-optimal N under the runs' own FLOPs per token vs Approach 2's IsoFLOP minima
#: on noise-free profiles of the same law (each parabola's minimum is within 3 % of the optimum,
#: ISOFLOP_MINIMUM_RTOL; the rest is the fitted law's own error).
FRONTIER_SAME_CONVENTION_RTOL = 0.05

# --- sharding (tests/test_sharding.py) ----------------------------------------------------------------
#: Per-step training losses on a sharded mesh (or across processes) vs one device: the same float32
#: math, but collectives sum partial results (batch shards, FSDP/TP partial products) in another
#: order. Measured on `tiny`, 12 steps: ≤ 1.1e-7 relative.
SHARDED_VS_SINGLE_LOSS = dict(rtol=1e-5, atol=1e-6)

# --- grouped matmul (tests/test_grouped_matmul.py) ------------------------------------------------
#: Grouped-matmul kernel vs ``jax.lax.ragged_dot``, float32: the same sums of ≤ 64 products in
#: another order (per-tile partial sums). Values and gradients are O(1)-O(30): measured ≤ 6e-6
#: absolute at M 64, K 32, N 48.
GMM_F32 = dict(rtol=1e-5, atol=1e-5)
#: bfloat16 inputs and outputs (float32 accumulation) vs ``ragged_dot`` on the same inputs: both
#: round one float32 sum to bf16, so they may differ by one bf16 ulp (≤ 2^-7 of the value).
GMM_BF16 = dict(rtol=8e-3, atol=8e-3)

# --- expert parallelism (tests/test_moe_parallel.py) ----------------------------------------------
# No constant of its own: the all-to-all dispatch is the one-device math with the batch-shard sums
# in another order, so it uses SHARDED_VS_SINGLE_LOSS (losses) and F32_GRAD (gradients, metrics,
# router bias). Measured on the micro MoE (8 experts, top-2), 10 steps on expert=4,data=2 and
# expert=2,fsdp=4: ≤ 1.7e-7 relative per-step loss.

# --- Clark et al. 2022's routed-LM law (tests/test_laws.py) ---------------------------------------
#: The least-squares fit (Huber δ large enough that every residual is quadratic) vs
#: ``numpy.linalg.lstsq`` on the same design (log L is linear in a, b, c, d): measured ≤ 2e-13.
ROUTED_LM_LSTSQ_ATOL = 1e-9
#: Fit quality per router on the released curves (final losses, k = 1, every other block routed, the
#: dense runs as E = 1), default Huber fit: R² on loss measured 0.9940 (Hash) – 0.9953 (RL-R); RMSE
#: of ln L measured 0.0081 – 0.0088. The floors leave room for a change of optimiser, not of data.
ROUTED_LM_R2_MIN = 0.99
ROUTED_LM_LOG_RMSE_MAX = 0.01
#: Constants fitted in another convention (natural logs, N in units of 1e9) mapped back to Eq. 1's
#: (base 10, N unnormalised): the same convex problem solved in another parametrisation, to the
#: optimiser's convergence.
ROUTED_LM_CONVENTION = dict(rtol=1e-5, atol=1e-7)

# --- MoE Efficiency Leverage (tests/test_experiments.py) ------------------------------------------
#: EL recovered by experiments/moe_leverage.py's analyze from synthetic frontiers of a known law
#: (the MoE reaches the dense loss with EL× less compute, EL = 2 and 4; 4 budgets × 3 sizes), with
#: 0.2 % log-normal noise on each run's loss and 0.2 % on its FLOPs: the fitted power laws' error at
#: the reference loss, amplified by 1/α = 10 when the dense fit is inverted (and extrapolated by EL×
#: in compute). Measured 1.2 % (EL 2) and 1.7 % (EL 4) at seed 0.
MOE_LEVERAGE_RTOL = 0.05
