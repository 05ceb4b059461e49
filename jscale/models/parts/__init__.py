"""Block parts for the shared scaffold (:mod:`jscale.models.lm`); the contract is in
:mod:`jscale.models.parts.base`.

* :mod:`~jscale.models.parts.attention` — grouped-query attention with RoPE, optional qk-norm and an
  optional prefix-KV input (a sequence mixer).
* :mod:`~jscale.models.parts.mamba_mixer` — Mamba-1's conv + selective scan (a sequence mixer).
* :mod:`~jscale.models.parts.swiglu` — the SwiGLU feed-forward.
* :mod:`~jscale.models.parts.moe` — the mixture-of-experts feed-forward (float32 router, top-k,
  dropless grouped-matmul dispatch or capacity mode, shared experts, router losses, the
  aux-loss-free router bias as model state).
"""
