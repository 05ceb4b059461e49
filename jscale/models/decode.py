"""Incremental decode on the shared LM scaffold: one token per row at a time, with per-layer caches.

A family built on :mod:`jscale.models.lm` gets decode from its parts (the part methods
``init_cache`` / ``decode``: :mod:`jscale.models.parts.base`). Position-wise parts (SwiGLU, dropless
MoE) need no cache; attention keeps a KV cache (:mod:`jscale.models.parts.attention`).

**The cache** (a pytree of arrays only, so a jitted step can donate it; its shapes fix the capacity)::

    {"pos": int32[],        # position of the next token (tokens decoded so far)
     "max_len": int32[],    # capacity in real tokens
     "stacks": {stack_key: {sublayer_name: the part's cache, stacked on L}}}

Only sub-layers whose part keeps a cache appear (a transformer's ``attn``: ``k_LBSGK``,
``v_LBSGK``, ``n_prefix_L``); ``stack_key`` is ``"layers"`` for a single-stack model, as in the
parameters.

**Prefixes.** :func:`init_cache` takes ``layer_inputs`` in the form :func:`jscale.models.lm.hidden`
takes them (``{sublayer_name: pytree with a leading L}``, or ``{stack_key: {...}}`` for several
stacks) and hands each layer its slice, once: attention preloads the prefix keys/values of its layer
input (per row ``{"prefix_k_LBSGK", "prefix_v_LBSGK"}``, or per stream ``{"prefix_k_LPGSK",
"prefix_v_LPGSK"}`` for stream-major rows) into its first ``n_prefix`` slots, without RoPE; real
token ``t`` then lives at slot ``n_prefix + t`` with RoPE position ``t``, and every step attends to
every prefix slot. Decoding a sequence from such a cache gives the logits of the full pass with the
same layer inputs. A decode step takes no layer inputs (a part keeps what it needs in its cache).

**A step** (:func:`hidden_step`): the stacks in order, each a ``lax.scan`` over its ``L`` (a Python
loop when ``spec.scan_layers`` is off), every layer ``x + part.decode(rms_norm(x))``, then the final
norm. Model state (the MoE router bias) is read, not updated. ``LMFamily.decode_step`` is
``lm.embed`` → :func:`hidden_step` → ``lm.logits``; a family that wraps the scaffold (ParScale:
tile the token over its streams, preload the prefixes, aggregate after the final norm) composes the
same functions.

**Capacity.** ``pos`` is traced under ``jit``, so a full cache cannot raise there: a step at
``pos >= max_len`` returns NaN hidden states (hence NaN logits), and the cache's last slot is
overwritten. Called outside ``jit`` (``pos`` concrete), :func:`hidden_step` raises instead; a
Python-level driver checks statically (``jscale.models.generate``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jscale import nn
from jscale.models.parts.base import decode_context
from jscale.models.spec import LMSpec, Stack
from jscale.sharding import constrain, constrain_params

Array = jax.Array


def init_cache(spec: LMSpec, batch_size: int, max_len: int, *, dtype: Any = None,
               layer_inputs: Any = None) -> dict[str, Any]:
    """An empty decode cache for ``batch_size`` rows and up to ``max_len`` tokens (layout in the
    module docstring), in ``dtype`` (default: the compute dtype ``spec.dtype``), with each layer's
    slice of ``layer_inputs`` (optional; how prefixes are preloaded) handed to its part."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"decode cache: batch_size={batch_size} and max_len={max_len} must be >= 1")
    dtype = jnp.dtype(spec.dtype if dtype is None else dtype)
    inputs = _per_stack(spec, layer_inputs)
    stacks: dict[str, Any] = {}
    for st in spec.layer_stacks:
        caches = {}
        for sub in st.block:
            inp = inputs.get(st.key, {}).get(sub.name)
            if inp is None:
                one = sub.part.init_cache(batch_size, max_len, dtype)
                stacked = jax.tree.map(
                    lambda a, n=st.n_steps: jnp.broadcast_to(a, (n, *a.shape)), one)
            else:
                layer = nn.unstack_names(inp)
                per_layer = [sub.part.init_cache(batch_size, max_len, dtype,
                                                 layer_input=jax.tree.map(lambda a, i=i: a[i], layer))
                             for i in range(st.n_steps)]
                stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
            if jax.tree.leaves(stacked):
                caches[sub.name] = _stacked_names(stacked)
        if caches:
            stacks[st.key] = caches
    return {"pos": jnp.zeros((), jnp.int32), "max_len": jnp.asarray(max_len, jnp.int32),
            "stacks": stacks}


def hidden_step(params: dict[str, Any], x_BD: Array, cache: dict[str, Any], spec: LMSpec, *,
                model_state: Any = None) -> tuple[Array, dict[str, Any]]:
    """One embedded token per row ``x_BD`` at position ``cache["pos"]`` → ``(final-normed hidden
    states h_BD, the cache advanced by one token)``. ``model_state`` (``None``: the parts' initial
    state) is read, not updated. NaN past the cache's capacity (module docstring)."""
    pos = cache["pos"]
    if not isinstance(pos, jax.core.Tracer) and int(pos) >= int(cache["max_len"]):
        raise ValueError(f"decode cache is full: it holds max_len={int(cache['max_len'])} tokens "
                         "(make it with a larger max_len)")
    x_BD = x_BD.astype(jnp.dtype(spec.dtype))
    ctx = decode_context(pos, x_BD.shape[0])
    new_stacks = {}
    for st in spec.layer_stacks:
        state = None if model_state is None else model_state.get(st.key, {})
        x_BD, stack_cache = _step_stack(params[st.key], x_BD, st, spec, ctx, pos, state,
                                        cache["stacks"].get(st.key, {}))
        if stack_cache:
            new_stacks[st.key] = stack_cache
    h_BD = nn.rms_norm(x_BD, params["final_norm"]["scale_D"], spec.norm_eps)
    h_BD = jnp.where(pos < cache["max_len"], h_BD, jnp.nan).astype(x_BD.dtype)
    return h_BD, {**cache, "pos": pos + 1, "stacks": new_stacks}


def _step_stack(stack_params: dict[str, Any], x_BD: Array, st: Stack, spec: LMSpec, ctx: Any,
                pos: Array, state_layers: dict[str, Any] | None,
                cache_layers: dict[str, Any]) -> tuple[Array, dict[str, Any]]:
    """One stack's layers on one token per row: ``(x_BD, the stack's new caches)``."""
    prepared = [sub.part.prepare(ctx) for sub in st.block]
    initial = {}  # without model state, every layer starts from its part's initial state
    if state_layers is None:
        for sub in st.block:
            s = sub.part.init_state()
            if jax.tree.leaves(s):
                initial[sub.name] = s
        state_layers = {}

    def body(x_BD, xs):
        p, state, cache = (nn.unstack_names(t) for t in xs)
        p = constrain_params(p)  # FSDP: this layer's weights are gathered here, inside the scan
        x_BD = constrain(x_BD, "BD")
        new_cache = {}
        for sub, pre in zip(st.block, prepared, strict=True):
            h_BD = nn.rms_norm(x_BD, p[sub.norm]["scale_D"], spec.norm_eps)
            y_BD, part_cache = sub.part.decode(
                p[sub.name], h_BD, cache.get(sub.name, {}), pos, prepared=pre,
                state=state.get(sub.name, initial.get(sub.name)))
            x_BD = x_BD + y_BD
            if sub.name in cache:
                new_cache[sub.name] = _stacked_names(part_cache)
        return x_BD, new_cache

    xs = (stack_params, state_layers, cache_layers)
    if spec.scan_layers:
        return jax.lax.scan(body, x_BD, xs)
    ys = []
    for i in range(st.n_steps):
        x_BD, y = body(x_BD, jax.tree.map(lambda a, i=i: a[i], xs))
        ys.append(y)
    return x_BD, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _per_stack(spec: LMSpec, layer_inputs: Any) -> dict[str, Any]:
    """``layer_inputs`` as ``{stack_key: {sublayer_name: ...}}`` (a one-stack model takes the
    ``{sublayer_name: ...}`` form), every name checked against the model."""
    stacks = spec.layer_stacks
    if not layer_inputs:
        return {}
    if len(stacks) == 1:
        layer_inputs = {stacks[0].key: layer_inputs}
    for key, subs in layer_inputs.items():
        st = next((s for s in stacks if s.key == key), None)
        if st is None:
            raise ValueError(f"layer inputs for stack {key!r}: the model's stacks are "
                             f"{[s.key for s in stacks]}")
        names = [sub.name for sub in st.block]
        for name in subs:
            if name not in names:
                raise ValueError(f"layer input for sub-layer {name!r} of stack {key!r}: its "
                                 f"sub-layers are {names}")
    return layer_inputs


def _stacked_names(tree: Any) -> Any:
    """A one-layer tree renamed to its stacked names (``k_BSGK`` → ``k_LBSGK``)."""
    if isinstance(tree, dict):
        return {(k if isinstance(v, dict) else nn.stack_name(k)): _stacked_names(v)
                for k, v in tree.items()}
    return tree
