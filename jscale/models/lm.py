"""The shared language-model scaffold every family is built on.

Token embedding (``embed.table_VD``) → ``n_layers`` blocks, parameters stacked on a leading ``L`` axis
and run with ``lax.scan`` (or a Python loop over the same stacked parameters) under a remat policy →
final RMSNorm (``final_norm.scale_D``) → LM head (the embedding table, tied, or ``head.w_DV``; logits
in float32). A block is a sequence of residual sub-layers ``x + part(rms_norm(x))``
(:class:`Sublayer`; parts in :mod:`jscale.models.parts`). A family describes its model as an
:class:`LMSpec` and gets init, the hidden-state pass, the head, counts, FLOPs and ``scale_init``
from here (:class:`LMFamily`).

**Stacks.** By default the blocks are one stack: ``n_layers`` copies of ``block``, parameters under
``params["layers"]``. A model whose layers are not all alike (dense layers first, then MoE layers;
an MoE FFN every other layer) lists several stacks (:class:`Stack`) instead (``LMSpec.stacks``): each is
``n_steps`` copies of its own block, parameters stacked on their own ``L = n_steps`` under their own
key (``params["layers"]``, ``params["moe_layers"]``, ...), scanned on its own, and the stacks run one
after another. A stack's block may hold several layers (a *period*: e.g. a dense layer then an MoE
layer, its sub-layers named apart), so a strictly periodic stack is still one scan. With one stack
keyed ``layers`` everything (param tree, init draws, state, aux) is exactly the single-stack model.

**Init.** Every leaf is declared (:class:`~jscale.models.parts.base.Leaf`) in the order embedding,
each sub-layer's norm and part leaves in block order, final norm, head. All truncated-normal leaves
come from one draw (their stacked sizes laid end to end, in that order); when the model also has
uniform leaves, the key is first split into ``(normal, uniform)`` and one uniform draw serves them
all, likewise in order. (One small program to compile instead of one per leaf.) ``init_scale``
multiplies exactly the normal leaves, which is what :func:`scale_init` rescales.

**Inside the scan** one layer's slice drops its ``L`` (``w_q_LDHK`` → ``w_q_DHK``,
:func:`jscale.nn.unstack_names`) and is constrained by name (FSDP's per-layer gather).

**Per-layer aux.** A part's ``apply`` returns a dict of scalars; the scan stacks them ``[L]`` and
:func:`hidden` reports each key as its **mean over the layers that report it** (every stack whose
block reports the key, each of its steps once): layers whose parts do not report a key do not dilute
it (a dense layer does not lower an MoE layer's load-balance loss). Keys ending in ``_loss`` are
losses the training core adds to the objective; other keys are metrics. Keys must be unique across
a block's parts.

**Non-gradient model state.** A part may declare per-layer state (``init_state``); the scaffold stacks
it as ``model_state[stack_key][sublayer_name]`` (``[L, ...]``; ``stack_key`` is ``"layers"`` for a
single-stack model), hands each layer its slice, collects the updated slices and returns them
(``stop_gradient``) as the new state. ``{}`` for stateless models. A member of a packed group of
different shapes (:mod:`jscale.models.packing`) also carries ``model_state["pack"]``, its true sizes:
the scaffold hands it to every part as ``Context.pack``, divides its residual RMSNorms' mean square
by its true ``d_model`` and returns it unchanged in the new state.

**Layer inputs.** ``layer_inputs`` (optional, ``{sublayer_name: pytree}`` with a leading ``L`` axis) is
scanned alongside the parameters; each part gets its layer's slice as ``layer_input`` (how
ParScale's per-layer prefix keys/values reach attention). A model of several stacks takes them per
stack, ``{stack_key: {sublayer_name: pytree}}`` (each with its stack's ``L``).

**Decode** (one token at a time, per-layer caches): :mod:`jscale.models.decode`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jscale import nn
from jscale.models import decode, sizing
from jscale.models.parts.base import Const, Context, Normal, Uniform
from jscale.models.spec import (  # noqa: F401  (re-exported: lm.LMSpec, lm.Sublayer, ...)
    DTYPES,
    PACK_KEY,
    REMAT_POLICIES,
    RESERVED_KEYS,
    LMSpec,
    Stack,
    Sublayer,
)
from jscale.sharding import constrain, constrain_params

Array = jax.Array
# ---------------------------------------------------------------------------------------------------
# init


def _entries(spec: LMSpec) -> list[tuple[tuple[str, ...], tuple[int, ...], Any, bool]]:
    """Every leaf of the model as ``(path, stacked shape, init, float32)``, in draw order."""
    D, V, s = spec.d_model, spec.vocab_size, spec.init_scale
    out = [(("embed", "table_VD"), (V, D), Normal(s / math.sqrt(D)), False)]
    for st in spec.layer_stacks:
        L = st.n_steps
        for sub in st.block:
            out.append(((st.key, sub.norm, "scale_LD"), (L, D), Const(1.0), False))
            for leaf in sub.part.leaves():
                path = (st.key, sub.name, *leaf.path[:-1], nn.stack_name(leaf.path[-1]))
                out.append((path, (L, *leaf.shape), leaf.init, leaf.float32))
    out.append((("final_norm", "scale_D"), (D,), Const(1.0), False))
    if not spec.tie_embeddings:
        out.append((("head", "w_DV"), (D, V), Normal(s / math.sqrt(D)), False))
    return out


def init(key: Array, spec: LMSpec) -> dict[str, Any]:
    """Initialize the parameters ``spec`` declares (draws as in the module docstring)."""
    pd = jnp.dtype(spec.param_dtype)
    entries = _entries(spec)
    normal = [e for e in entries if isinstance(e[2], Normal)]
    uniform = [e for e in entries if isinstance(e[2], Uniform)]
    normal_key = key
    if uniform:
        normal_key, uniform_key = jax.random.split(key)
    values: dict[tuple[str, ...], Array] = {}
    z = nn.truncated_normal(normal_key, (sum(math.prod(e[1]) for e in normal),), 1.0, jnp.float32)
    offset = 0
    for path, shape, leaf_init, f32 in normal:
        size = math.prod(shape)
        values[path] = (z[offset:offset + size].reshape(shape) * leaf_init.std).astype(
            jnp.float32 if f32 else pd)
        offset += size
    if uniform:
        r = jax.random.uniform(uniform_key, (sum(math.prod(e[1]) for e in uniform),))
        offset = 0
        for path, shape, u, f32 in uniform:
            size = math.prod(shape)
            x = u.low + (u.high - u.low) * r[offset:offset + size].reshape(shape)
            values[path] = (u.post(x) if u.post is not None else x).astype(
                jnp.float32 if f32 else pd)
            offset += size
    params: dict[str, Any] = {}
    for path, shape, leaf_init, f32 in entries:
        if isinstance(leaf_init, Const):
            dtype = jnp.float32 if f32 else pd
            if callable(leaf_init.fill):
                value = jnp.broadcast_to(leaf_init.fill(), shape).astype(dtype)
            else:
                value = jnp.full(shape, leaf_init.fill, dtype)
        else:
            value = values[path]
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return params


def scale_init(params: dict[str, Any], init_scale: Array, spec: LMSpec) -> dict[str, Any]:
    """``params`` made with ``init_scale=1`` → as if made with ``init_scale`` (a traced array, so a
    sweep can vary it per run): every truncated-normal leaf scales by it."""
    scaled = {path for path, _, leaf_init, _ in _entries(spec) if isinstance(leaf_init, Normal)}

    def leaf(path, x):
        if tuple(str(k.key) for k in path) in scaled:
            return x * init_scale.astype(x.dtype)
        return x
    return jax.tree_util.tree_map_with_path(leaf, params)


def init_model_state(spec: LMSpec) -> dict[str, Any]:
    """The parts' non-gradient state, stacked on ``L``: ``{stack_key: {name: state}}`` (``stack_key``
    ``"layers"`` for a single-stack model) for the stacks whose parts have state, or ``{}``."""
    out = {}
    for st in spec.layer_stacks:
        layers = {}
        for sub in st.block:
            state = sub.part.init_state()
            if jax.tree.leaves(state):
                layers[sub.name] = _stack_tree(state, st.n_steps)
        if layers:
            out[st.key] = layers
    return out


def _stack_tree(tree: Any, L: int) -> Any:
    if isinstance(tree, dict):
        return {(k if isinstance(v, dict) else nn.stack_name(k)): _stack_tree(v, L)
                for k, v in tree.items()}
    return jnp.broadcast_to(tree, (L, *jnp.shape(tree)))


# ---------------------------------------------------------------------------------------------------
# the forward pass


def embed(params: dict[str, Any], tokens_BT: Array, spec: LMSpec) -> Array:
    """Token ids ``[B, T]`` → embedded inputs ``x_BTD`` in the compute dtype."""
    table_VD = constrain_params(params["embed"]["table_VD"], "VD")
    return constrain(nn.embed(table_VD, tokens_BT, jnp.dtype(spec.dtype)), "BTD")


def remat(fn, policy: str):
    """``fn`` under the rematerialization ``policy`` (see :data:`REMAT_POLICIES`)."""
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "save_attention": jax.checkpoint_policies.save_only_these_names("attn_context"),
    }
    return jax.checkpoint(fn, policy=policies[policy])


def hidden(params: dict[str, Any], x_BTD: Array, spec: LMSpec, *,
           segment_ids_BT: Array | None = None, model_state: Any = None,
           layer_inputs: Any = None) -> tuple[Array, dict[str, Array], Any]:
    """Embedded inputs → ``(final-normed hidden states x_BTD, aux, new_model_state)``."""
    x_BTD = x_BTD.astype(jnp.dtype(spec.dtype))
    B, T, _ = x_BTD.shape
    stacks = spec.layer_stacks
    if model_state is None:
        model_state = init_model_state(spec)
    pack = model_state.get(PACK_KEY)
    ctx = Context(segment_ids_BT=segment_ids_BT,
                  positions_BT=jnp.broadcast_to(jnp.arange(T), (B, T)), pack=pack)
    if len(stacks) == 1:
        layer_inputs = {stacks[0].key: layer_inputs} if layer_inputs else {}
    layer_inputs = layer_inputs or {}
    aux_parts: dict[str, list[Array]] = {}
    new_state = {}
    for st in stacks:
        x_BTD, aux_L, state_L = _run_stack(params[st.key], x_BTD, st, spec, ctx,
                                           model_state.get(st.key, {}),
                                           layer_inputs.get(st.key, {}))
        for k, v in aux_L.items():
            aux_parts.setdefault(k, []).append(v)
        if state_L:
            new_state[st.key] = jax.lax.stop_gradient(state_L)
    if pack is not None:
        new_state[PACK_KEY] = pack
    x_BTD = nn.rms_norm(x_BTD, params["final_norm"]["scale_D"], spec.norm_eps, _width(ctx))
    aux = {k: jnp.mean(v[0] if len(v) == 1 else jnp.concatenate(v)) for k, v in aux_parts.items()}
    return x_BTD, aux, new_state


def _run_stack(stack_params: dict[str, Any], x_BTD: Array, st: Stack, spec: LMSpec, ctx: Context,
               state_layers: dict[str, Any], inputs: dict[str, Any]):
    """One stack's blocks over ``x_BTD``: ``(x_BTD, aux {key: [L]}, new state {name: [L, ...]})``."""
    prepared = [sub.part.prepare(ctx) for sub in st.block]

    def body(x_BTD, xs):
        p, state, inp = (nn.unstack_names(t) for t in xs)
        p = constrain_params(p)  # FSDP: this layer's weights are gathered here, inside the scan
        x_BTD = constrain(x_BTD, "BTD")
        aux, new_state = {}, {}
        for sub, pre in zip(st.block, prepared, strict=True):
            h_BTD = nn.rms_norm(x_BTD, p[sub.norm]["scale_D"], spec.norm_eps, _width(ctx))
            y_BTD, part_aux, part_state = sub.part.apply(
                p[sub.name], h_BTD, ctx, prepared=pre, state=state.get(sub.name),
                layer_input=inp.get(sub.name))
            x_BTD = x_BTD + y_BTD
            for k, v in part_aux.items():
                if k in aux:
                    raise ValueError(f"aux key {k!r} reported by two parts of the block")
                aux[k] = v
            if sub.name in state:
                new_state[sub.name] = _restack_names(part_state)
        return x_BTD, (aux, new_state)

    body = remat(body, spec.remat)
    xs = (stack_params, state_layers, inputs)
    if spec.scan_layers:
        x_BTD, (aux_L, state_L) = jax.lax.scan(body, x_BTD, xs)
    else:
        ys = []
        for i in range(st.n_steps):
            x_BTD, y = body(x_BTD, jax.tree.map(lambda a, i=i: a[i], xs))
            ys.append(y)
        aux_L, state_L = jax.tree.map(lambda *a: jnp.stack(a), *ys)
    return x_BTD, aux_L, state_L


def _width(ctx: Context) -> Array | None:
    """The residual norms' true width: a packed member's ``d_model`` (``None``: the axis length)."""
    return None if ctx.pack is None else ctx.pack["d_model"]


def _restack_names(tree: Any) -> Any:
    """One layer's state tree renamed to its stacked names (the scan stacks the values)."""
    if isinstance(tree, dict):
        return {(k if isinstance(v, dict) else nn.stack_name(k)): _restack_names(v)
                for k, v in tree.items()}
    return tree


def logits(params: dict[str, Any], x_BxD: Array, spec: LMSpec) -> Array:
    """Final-normed hidden states ``[..., D]`` → float32 logits ``[..., V]`` (tied or untied head)."""
    w_DV = params["embed"]["table_VD"].T if spec.tie_embeddings else params["head"]["w_DV"]
    return jnp.einsum("...d,dv->...v", x_BxD, w_DV.astype(x_BxD.dtype),
                      preferred_element_type=jnp.float32)


def head(params: dict[str, Any], x_BTD: Array, spec: LMSpec) -> Array:
    """Final-normed hidden states ``x_BTD`` → ``logits_BTV`` (float32)."""
    return constrain(logits(params, x_BTD, spec), "BTV")


# ---------------------------------------------------------------------------------------------------
# counting


def count_params(spec: LMSpec) -> dict[str, int]:
    """Analytic parameter count from the parts' counts: ``total``, ``embedding`` (the V×D table, plus
    the untied head), ``non_embedding`` (blocks and the final norm; Kaplan et al.'s N),
    ``with_head`` (``non_embedding`` plus the V×D output head, tied or not: the N whose FLOPs ``6ND``
    counts — Porian et al. 2024) and ``active`` (parameters used per token: ``total`` for dense
    models)."""
    D, V = spec.d_model, spec.vocab_size
    embedding = V * D * (1 if spec.tie_embeddings else 2)
    non_embedding = D + sum(st.n_steps * sum(sub.part.count() + D for sub in st.block)
                            for st in spec.layer_stacks)
    total = embedding + non_embedding
    return {"total": total, "non_embedding": non_embedding, "embedding": embedding,
            "with_head": non_embedding + V * D, "active": total}


def flops_per_token(spec: LMSpec, seq_len: int,
                    part_kwargs: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
    """Model FLOPs per token: the parts' ``flops(seq_len, **part_kwargs[name])`` per layer plus the
    LM head ``2·D·V``; ``training`` is 3× ``forward`` (backward = 2× forward; rematerialization is
    not counted)."""
    part_kwargs = part_kwargs or {}
    forward = 2 * spec.d_model * spec.vocab_size
    for st in spec.layer_stacks:
        per_step = 0
        for sub in st.block:
            per_step = per_step + sub.part.flops(seq_len, **part_kwargs.get(sub.name, {}))
        forward = st.n_steps * per_step + forward
    return {"forward": float(forward), "training": float(3 * forward)}


# ---------------------------------------------------------------------------------------------------
# the family base


class LMFamily:
    """A family built on the scaffold: a subclass sets ``name`` and ``config_cls`` and implements
    ``spec(cfg)``, ``shape_step``, ``describe`` and ``max_seq_len``; it may override the counts and
    FLOPs. See :class:`jscale.models.protocol.Family` for the contract."""

    name: str
    config_cls: type

    def spec(self, cfg: Any) -> LMSpec:
        raise NotImplementedError

    def init(self, key: Array, cfg: Any) -> dict[str, Any]:
        return init(key, self.spec(cfg))

    def init_model_state(self, cfg: Any) -> dict[str, Any]:
        return init_model_state(self.spec(cfg))

    def embed(self, params: dict[str, Any], tokens_BT: Array, cfg: Any) -> Array:
        return embed(params, tokens_BT, self.spec(cfg))

    def hidden(self, params: dict[str, Any], x_BTD: Array, cfg: Any, *,
               segment_ids_BT: Array | None = None, model_state: Any = None,
               layer_inputs: Any = None) -> tuple[Array, dict[str, Array], Any]:
        return hidden(params, x_BTD, self.spec(cfg), segment_ids_BT=segment_ids_BT,
                      model_state=model_state, layer_inputs=layer_inputs)

    def head(self, params: dict[str, Any], x_BTD: Array, cfg: Any) -> Array:
        return head(params, x_BTD, self.spec(cfg))

    def decode_init(self, params: dict[str, Any], cfg: Any, batch_size: int, max_len: int) -> Any:
        return decode.init_cache(self.spec(cfg), batch_size, max_len)

    def decode_step(self, params: dict[str, Any], token_B: Array, cache: Any, cfg: Any, *,
                    model_state: Any = None) -> tuple[Array, Any]:
        spec = self.spec(cfg)
        h_BD, cache = decode.hidden_step(params, embed(params, token_B[:, None], spec)[:, 0],
                                         cache, spec, model_state=model_state)
        return logits(params, h_BD, spec), cache

    def scale_init(self, params: dict[str, Any], init_scale: Array, cfg: Any) -> dict[str, Any]:
        return scale_init(params, init_scale, self.spec(cfg))

    def count_params(self, cfg: Any) -> dict[str, int]:
        return count_params(self.spec(cfg))

    def flops_per_token(self, cfg: Any, seq_len: int) -> dict[str, float]:
        return flops_per_token(self.spec(cfg), seq_len)

    def memory_bytes(self, cfg: Any, batch_size: int, seq_len: int) -> int:
        """Rough per-run device footprint: params, grads and Adam moments (4 copies) in float32, plus
        activations (about 24 floats per layer per token and width) and the float32 logits twice."""
        spec = self.spec(cfg)
        tokens = batch_size * seq_len
        return 4 * (4 * self.count_params(cfg)["total"]
                    + 24 * tokens * spec.n_layers * spec.d_model + 2 * tokens * spec.vocab_size)

    def init_scale(self, cfg: Any) -> float:
        return self.spec(cfg).init_scale

    def param_groups(self, cfg: Any) -> dict[str, tuple[str, ...] | None]:
        return {"all": None}

    def shape_step(self, base_model: Any, *, head_dim: int | None,
                   ffn_ratio: float | None) -> tuple[int, Any]:
        raise NotImplementedError

    def shape_for_params(self, n_params: float, base_model: Any, **kwargs: Any) -> Any:
        return sizing.shape_for_params(self, n_params, base_model, **kwargs)

    def describe(self, cfg: Any) -> str:
        raise NotImplementedError

    def dim_fields(self, cfg: Any) -> dict[str, str]:
        """The config field behind each logical dim a mesh may shard (for error messages)."""
        return {"D": "model.d_model", "V": "model.vocab_size"}

    def max_seq_len(self, cfg: Any) -> int | None:
        raise NotImplementedError
