"""Growth operators: a trained small model's parameters → the initialization of a larger model
(Du et al. 2024, "Stacking Your Transformers: A Closer Look at Model Growth for Efficient LLM
Pre-Training", arXiv 2405.15319; reference code tongxuluo/prts).

:func:`grow` ``(params_small, cfg_small, cfg_big, op, *, key=None, **options) -> params_big`` runs
the operator ``op`` of :data:`OPERATORS` — the table of what each operator grows, whether it
preserves the function, which families it supports and whether it is implemented. Each operator is
a pure function ``(params_small, cfg_small, cfg_big, key) -> params_big`` over the scaffold's tree
(:mod:`jscale.models.lm`); its result has exactly the structure, shapes and dtypes of
``models.init(key, cfg_big)``. One call grows the depth or the width, not both (two calls through
an intermediate config do both). :func:`grow_optimizer_state` grows an optax state's moments with
the same maps; :func:`growth_tokens` is the paper's guideline for when to grow.

**Depth** (``cfg_big`` is ``cfg_small`` with ``n_layers`` × g, g an integer ≥ 2). Every stack's
leading ``L`` axis becomes ``g·L``; the embedding, the final norm and the head are copied.

* ``stack`` (G_stack): the stack repeated whole, layers ``0..L−1, 0..L−1, …`` (prts'
  ``stacking_list``). Not function-preserving.
* ``interpolate``: each layer repeated ``g`` times in place, ``0, 0, 1, 1, …``. Not
  function-preserving.
* ``zero`` with more layers: new layers whose residual output projections are zero — attention
  ``w_o``, SwiGLU ``w_down``, the MoE routed and shared experts' ``w_down``, Mamba's ``w_out`` and
  ``b_out`` — so each new block is the identity and the function is preserved exactly. Placement
  (option ``placement``): ``"interleave"`` (default) puts each original layer's ``g − 1`` new layers
  right after it (``interpolate``'s order), ``"end"`` puts them after the original stack
  (``stack``'s order). A new layer's other parameters copy the original layer it repeats (its
  neighbour, for ``"interleave"``): no key needed, and its input projections fit the statistics of
  the stream they read.

A model of several stacks (the MoE transformer: ``layers`` / ``moe_layers`` / ``tail_layers``,
:mod:`jscale.models.transformer`) grows each stack ``g``-fold on its own, in the stack's steps: an
MoE period of ``every`` layers moves as one (``interpolate`` repeats periods, not layers). That is
what ``cfg_big`` describes exactly when ``moe.first_dense_layers`` is scaled by ``g`` too and the
dense tail after the last period, ``g``-fold, is still shorter than ``every``; other configs are
refused. With no leading dense layers and no tail, per-stack ``stack`` is G_stack of the whole
model, layer for layer. The MoE router bias is model state, not a parameter: it is not grown here
(keep it, stacked on each stack's ``L`` like the parameters, or start it at zero).

**Width** (``d_model``, ``d_ff``, ``n_heads``, ``n_kv_heads``, ``moe.d_expert``; Mamba's
``d_model``, ``expand``, ``dt_rank``; the head dim K, the vocabulary, the experts, the SSM state and
the conv width stay). A leaf grows along the axes its shape letters name (:mod:`jscale.nn`): ``D``
the model width, ``F`` its part's width (``d_ff``, the routed or the shared experts' width, Mamba's
inner width), ``H``/``G`` the query/kv heads, ``J`` Mamba's Δ rank. The small model's units keep
the leading positions of every axis. Heads are laid out ``[G, H/G]`` (query head ``h`` reads kv
group ``h // (H/G)``), so old head ``(g, j)`` lands at ``g·H_big/G_big + j`` and keeps its kv group;
``n_kv_heads`` and ``n_heads / n_kv_heads`` may grow, not shrink.

* ``zero``: the small tensors in the leading block and every new entry 0, except in the
  constant-initialised leaves (norm scales, Mamba's ``A_log`` and ``D``, biases), whose new entries
  are ``cfg_big``'s init. New FFN units, heads, experts' units and Mamba channels get zero weights in
  and out, and new model features stay zero in the residual stream: F/H/G/J growth preserves the
  function exactly. **RMSNorm over a wider D**: with the new features zero the mean square over
  ``D_big`` is ``r = D_small/D_big`` times the small one, so the normalized old features come out
  ``sqrt(1/r)`` too large; every RMSNorm scale over D (its new entries the init 1) is multiplied
  by ``sqrt(r)``. The grown model then computes exactly the small model with the RMSNorms'
  epsilon ``eps/r`` (``sqrt(r)·rsqrt(r·ms + eps) = rsqrt(ms + eps/r)``) — preserved up to that
  change of epsilon, not exactly. A new unit whose weights in and out are all zero also gets
  zero gradient (a SwiGLU unit's ``silu(0)·0``; a feature nothing writes and the head reads with
  weight 0): zero growth leaves waking the new width to something else (noise, the ``random``
  operator).
* ``direct_width`` (Net2Net / bert2BERT's function-preserving expansion): every new unit copies an
  existing one. New FFN units, experts' units, Mamba channels and Δ ranks copy randomly chosen old
  ones (drawn with ``key``, one choice per kind for the whole model, as prts' bert2BERT draws one
  set of indices); a new kv group copies a random old group, and a new query head a random old head
  of the group its own group copies. Every weight that reads a copied unit (``w_o`` over heads,
  ``w_down`` over F, Mamba's x_proj and out_proj over F, dt_proj over J) is divided by the unit's
  number of copies: the function is preserved exactly. ``d_model`` grows only by an integer factor
  ``g``, deterministically: feature ``i`` copies feature ``i mod D_small``, so each appears ``g``
  times, the mean square — hence every RMSNorm's output — is unchanged exactly (epsilon included),
  and the readers of the normed features (linear maps, and the head, tied or not) are divided by
  ``g`` through the RMSNorm scales over D. Random duplicates of features would change the mean
  square in a way no scale undoes, so other factors are refused.

**G_random** (``random``, :mod:`~jscale.growth.masked`): the new parameters drawn by
``cfg_big``'s init (depth: new layers interleaved), blended in during the grown run by a factor
``m`` rising 0 → 1 over ``growth.grow_steps`` steps — new layers compute ``x + m·block(x)``, new
width entries are scaled by ``m`` — exactly ``zero``'s model at ``m = 0`` and the stored tree from
``m = 1`` on (:func:`blend`, applied by :func:`jscale.core.effective_params`; ``m`` is traced: one
compile).

**G_learn** (``learn``, LiGO, Wang et al. 2023, :mod:`~jscale.growth.ligo`): the big parameters
as linear expansions of the small ones — per-leaf depth matrices ``[L_big, L_small]`` and width
matrices per grown kind tied across layers — started as ``stack``/``interpolate`` (depth) or
``direct_width`` (width, so function-preserving at step 0), trained for ``steps`` Adam steps on the
big model's loss over ``batches`` (only the matrices), then materialised into an ordinary tree.

**Optimizer state.** :func:`grow_optimizer_state` grows every subtree of an optax state with the
parameters' tree structure and shapes (Adam's ``mu`` and ``nu`` in :func:`jscale.optim.
make_optimizer`'s ``inject_hyperparams(chain(clip, adamw))``) with the operator's maps: ``stack`` and
``interpolate`` copy the moments like the parameters; ``zero`` and ``direct_width`` move the old
entries to their new positions and zero the new ones (all of a new layer, for zero depth growth).
Moments are moved, not rescaled with the parameters; counts and hyperparameters are kept.

**Modules.** :mod:`~jscale.growth.ops` (the table and the public functions),
:mod:`~jscale.growth.plans` (how each leaf grows), :mod:`~jscale.growth.index` (the model as growth
sees it; the index maps), :mod:`~jscale.growth.checks` (what is refused), :mod:`~jscale.growth.spec`
(the text form ``OP[:G[:PLACEMENT]]`` of one growth step, ``jscale train --grow``).
"""

from __future__ import annotations

from jscale.growth.checks import DEPTH_FIELDS, FAMILIES, FREE_FIELDS, WIDTH_FIELDS
from jscale.growth.masked import blend, blend_factors
from jscale.growth.ops import (
                               OPERATORS,
                               Operator,
                               direct_width,
                               grow,
                               grow_optimizer_state,
                               growth_tokens,
                               interpolate,
                               learn,
                               operator,
                               random,
                               stack,
                               zero,
)
from jscale.growth.plans import PLACEMENTS
from jscale.growth.spec import GRAMMAR, GrowthSpec, grammar_help, parse_spec

__all__ = ["DEPTH_FIELDS", "FAMILIES", "FREE_FIELDS", "GRAMMAR", "OPERATORS", "GrowthSpec",
           "Operator", "PLACEMENTS", "WIDTH_FIELDS", "blend", "blend_factors", "direct_width",
           "grammar_help", "grow", "grow_optimizer_state", "growth_tokens", "interpolate", "learn",
           "operator", "parse_spec", "random", "stack", "zero"]
