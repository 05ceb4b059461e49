"""The training core both drivers share — :func:`jscale.train.train` (one run) and
:mod:`jscale.sweep.group` (a group of runs ``vmap``-ed over R): pure, vmappable functions over a
:class:`TrainState` pytree.

* :func:`member_data` / :func:`init_state`: one init-state builder. What may differ between the members
  of a group — PRNG key, init scale, the optimizer's injected hyperparameters — is *member data*; a
  single run is a group of one (its own member data). ``params=`` starts from given parameters
  instead of the family's init (growth, two-stage training); the optimizer state is fresh either way.
* :func:`loss_fn`, :func:`train_step`, :func:`member_step` (a sweep member's step: frozen once its
  own steps are done or its loss is unhealthy), :func:`eval_loss`, :func:`healthy`.
* :func:`make_layout`, :func:`state_shardings`, :func:`make_init_state`: one layout builder and one
  placement of the initial state on it.

A family's non-gradient training state (``TrainState.model_state``: an MoE router bias, …) starts as
``models.init_model_state(cfg)``, goes into every forward pass and comes back updated from
``models.forward``; it is never differentiated, it is checkpointed with the rest of the state, and in
a vmapped sweep each member has its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jscale import data as data_lib
from jscale import mesh as mesh_lib
from jscale import models, optim
from jscale import sharding as sharding_lib
from jscale.config import EPOCHS_WARN, ConfigError, RunConfig

Array = jax.Array

#: The optimizer hyperparameters injected from member data (``optax.inject_hyperparams``).
HYPERPARAMS = ("learning_rate", "weight_decay", "warmup_steps", "total_steps")


def healthy(loss, threshold: float):
    """Whether a training loss (array or scalar) is finite and not above the divergence
    ``threshold`` (``RunConfig.divergence_threshold``), compared in float32 — the losses' dtype — so
    the host check and the sweep's in-program check agree; numpy and traced values alike."""
    xp = jnp if isinstance(loss, jax.Array) else np
    loss = xp.asarray(loss, xp.float32)
    return xp.isfinite(loss) & (loss <= xp.float32(threshold))


def check_epochs(cfg: RunConfig, corpus: data_lib.Corpus, *, warn: bool = True) -> float:
    """Epochs the whole of ``cfg``'s run makes over ``corpus``'s training split; raise
    :class:`ConfigError` above ``data.max_epochs``, warn above ``EPOCHS_WARN`` (if ``warn``)."""
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    n = data_lib.epochs(corpus, tokens)
    what = (f"{tokens:,} training tokens over a training split of {len(corpus.train_tokens):,} "
            f"tokens is {n:.3g} epochs")
    if n > cfg.data.max_epochs:
        raise ConfigError(f"data.max_epochs: {what}, above the limit of {cfg.data.max_epochs:g}; "
                          "use a larger corpus (data.path), fewer steps, or raise data.max_epochs "
                          "if repeated data is what you mean to study")
    if warn and n > EPOCHS_WARN:
        warnings.warn(f"jscale: {what} (> {EPOCHS_WARN:g}: repeated tokens are worth less than "
                      "fresh ones; a law fitted on such runs is not a compute-optimal one)",
                      stacklevel=3)
    return n


# ---------------------------------------------------------------------------------------------------
# state


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training: a pytree, so it jits, vmaps and checkpoints."""

    step: Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any
    rng: Array  # uint32[2] raw PRNG key, for stochastic layers
    model_state: Any  # the family's non-gradient state (models.init_model_state); {} for most


def member_data(runs: Sequence[RunConfig], common: RunConfig | None = None) -> dict[str, np.ndarray]:
    """Per-member arrays ``[R]`` of ``runs`` trained by programs built for ``common`` (default: the
    first run): PRNG keys, the init scale relative to ``common``'s, and the injected hyperparameters."""
    common = runs[0] if common is None else common
    base_scale = models.init_scale(common.model)
    with jax.ensure_compile_time_eval():  # host arrays, even while a caller is being traced
        keys = np.stack([np.asarray(jax.random.PRNGKey(r.train.seed)) for r in runs])
    return {
        "key": keys,
        "init_scale": np.array([models.init_scale(r.model) / base_scale for r in runs],
                               np.float32),
        "learning_rate": np.array([r.optim.lr for r in runs], np.float32),
        "weight_decay": np.array([r.optim.weight_decay for r in runs], np.float32),
        "warmup_steps": np.array([r.optim.warmup_steps for r in runs], np.float32),
        "total_steps": np.array([r.train.steps for r in runs], np.float32),
    }


def init_state(cfg: RunConfig, optimizer: optax.GradientTransformation,
               member: dict[str, Any] | None = None, *, params: Any = None,
               opt_state: Any = None) -> TrainState:
    """The initial state of one member (pure: ``vmap`` it over member data ``[R]``).

    ``member``: one member's data (:func:`member_data` without the R axis; default: ``cfg``'s own —
    a single run). ``params``: start from these parameters instead of ``models.init`` (they must have
    the family's tree, shapes and dtypes). ``opt_state``: an optimizer state for ``params`` to start
    from (a grown source's, :func:`jscale.growth.grow_optimizer_state`): its inner state — the
    clipping's and Adam's moments and Adam's count — is kept; the schedule's count and the injected
    hyperparameters are this run's. Without it the optimizer state is fresh.
    """
    if member is None:
        member = jax.tree.map(lambda x: x[0], member_data([cfg]))
    init_key, rng = jax.random.split(member["key"])
    if params is None:
        params = models.scale_init(models.init(init_key, cfg.model), member["init_scale"],
                                   cfg.model)
    else:
        check_params(params, cfg)
    fresh = optimizer.init(params)
    if opt_state is not None:
        if jax.tree.structure(opt_state.inner_state) != jax.tree.structure(fresh.inner_state):
            raise ConfigError("opt_state: its inner state does not match this run's optimizer "
                              f"({jax.tree.structure(opt_state.inner_state)} vs "
                              f"{jax.tree.structure(fresh.inner_state)})")
        fresh = fresh._replace(inner_state=jax.tree.map(
            lambda x, f: jnp.asarray(x, f.dtype), opt_state.inner_state, fresh.inner_state))
    opt_state = fresh
    hp = {k: jnp.asarray(member[k]) for k in HYPERPARAMS}
    opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, **hp})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=rng,
                      model_state=models.init_model_state(cfg.model))


def check_params(params: Any, cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` unless ``params`` has the tree, shapes and dtypes of ``cfg``'s
    model (what ``init_params=`` must match)."""
    want = jax.eval_shape(lambda: models.init(jax.random.PRNGKey(0), cfg.model))
    got_tree, want_tree = jax.tree.structure(params), jax.tree.structure(want)
    if got_tree != want_tree:
        raise ConfigError(f"init_params: the parameter tree does not match the model's "
                          f"({got_tree} vs {want_tree})")
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(want),
                            strict=True):
        if (tuple(np.shape(g)), jnp.result_type(g)) != (w.shape, w.dtype):
            raise ConfigError(f"init_params: {jax.tree_util.keystr(path)} is "
                              f"{jnp.result_type(g)}{list(np.shape(g))}, the model's is "
                              f"{w.dtype}{list(w.shape)}")


# ---------------------------------------------------------------------------------------------------
# loss, step, eval


def loss_and_state(params: Any, batch: dict[str, Array], model_cfg: Any, model_state: Any = None
                   ) -> tuple[Array, tuple[dict[str, Array], Any]]:
    """``(loss, (metrics, new_model_state))``: :func:`jscale.models.loss_and_state` — mean
    next-token cross-entropy (float32) plus every auxiliary ``*_loss`` the model reports;
    ``metrics`` holds ``ce_loss`` and every aux value."""
    return models.loss_and_state(params, batch, model_cfg, model_state)


def loss_fn(params: Any, batch: dict[str, Array], model_cfg: Any, model_state: Any = None
            ) -> tuple[Array, dict[str, Array]]:
    """:func:`loss_and_state` without the new model state: ``(loss, metrics)``."""
    loss, (metrics, _) = loss_and_state(params, batch, model_cfg, model_state)
    return loss, metrics


def trainable_keys(cfg: RunConfig) -> tuple[str, ...] | None:
    """The top-level parameter keys ``train.trainable`` trains (``None``: all), from the family's
    :meth:`~jscale.models.protocol.Family.param_groups`."""
    return models.family_of(cfg.model).param_groups(cfg.model)[cfg.train.trainable]


def _frozen(tree: dict[str, Any], keys: tuple[str, ...] | None, frozen) -> dict[str, Any]:
    if keys is None:
        return tree
    return {k: (v if k in keys else jax.tree.map(frozen, v)) for k, v in tree.items()}


def effective_params(params: Any, step: Array, cfg: RunConfig) -> Any:
    """The parameters the model computes with at ``step``: ``params`` itself, except while a run
    grown by the ``random`` operator blends its new parameters in (``growth.grow_steps``,
    :func:`jscale.growth.blend`: a factor ``m = step / grow_steps`` rising to 1, traced, so the
    program is compiled once)."""
    g = cfg.growth
    if g is None or g.op_name != "random" or g.grow_steps == 0:
        return params
    from jscale import growth
    m = jnp.minimum(step.astype(jnp.float32) / g.grow_steps, 1.0)
    return growth.blend(params, growth.blend_factors(cfg.source_config().model, cfg.model), m)


def train_step(state: TrainState, batch: dict[str, Array], *, cfg: RunConfig,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update (pure: jit it, or vmap it over members). The gradient is taken with
    respect to the parameters only; the model state comes back updated from the forward pass.
    With ``train.trainable`` a group, the other parameters are frozen: no gradient flows to them
    (``stop_gradient``: XLA drops their backward matmuls) and their update is zero. A run grown by
    ``random`` computes with :func:`effective_params` (the gradient flows through the blend)."""
    keys = trainable_keys(cfg)
    (loss, (aux, model_state)), grads = jax.value_and_grad(
        lambda p, *a: loss_and_state(
            effective_params(_frozen(p, keys, jax.lax.stop_gradient), state.step, cfg), *a),
        has_aux=True)(state.params, batch, cfg.model, state.model_state)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = _frozen(updates, keys, jnp.zeros_like)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": optim.current_lr(state.opt_state, state.step, cfg.optim), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         model_state=model_state), metrics


def member_step(state: TrainState, alive: Array, batch: dict[str, Array], active: Array, *,
                cfg: RunConfig, optimizer: optax.GradientTransformation):
    """A sweep member's step: ``(state, alive, metrics)``. The update is kept only while the member
    is ``active`` (within its own steps) and ``alive`` (every loss so far healthy); otherwise its
    whole state — model state included — stays as it was. Masking is per member, so the other members
    of a vmapped group compute exactly what they would alone."""
    new, metrics = train_step(state, batch, cfg=cfg, optimizer=optimizer)
    alive = alive & (healthy(metrics["loss"], cfg.divergence_threshold) | ~active)
    keep_new = active & alive
    state = jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, state)
    return state, alive, metrics


def eval_loss(state: TrainState, batch: dict[str, Array], cfg: RunConfig) -> Array:
    """Mean cross-entropy of ``batch`` under the state's (:func:`effective_params`) parameters and
    model state."""
    params = effective_params(state.params, state.step, cfg)
    return loss_fn(params, batch, cfg.model, state.model_state)[1]["ce_loss"]


# ---------------------------------------------------------------------------------------------------
# layout and placement


def make_layout(cfg: RunConfig, *, sweep: bool = False) -> sharding_lib.Layout | None:
    """The device layout ``cfg.mesh`` asks for, checked against ``cfg`` and its parameters' abstract
    shapes (``sweep`` allows the ``runs`` axis); ``None`` for the default mesh (every axis 1): the
    single-device path, no mesh and no constraints."""
    shapes = jax.eval_shape(lambda: models.init(jax.random.PRNGKey(0), cfg.model))
    return mesh_lib.make_layout(cfg, shapes, sweep=sweep, dim_fields=models.dim_fields(cfg.model))


def state_shardings(cfg: RunConfig, optimizer: optax.GradientTransformation,
                    layout: sharding_lib.Layout, *, members: int | None = None) -> TrainState:
    """Shardings of the whole ``TrainState`` under ``layout``: parameters by their names' dims, the
    optimizer's moments like their parameters, everything else replicated; with ``members`` (a
    vmapped group), every leaf has a leading R axis over ``runs``."""
    if members is None:
        abstract = jax.eval_shape(lambda: init_state(cfg, optimizer))
    else:
        abstract = jax.eval_shape(jax.vmap(lambda d: init_state(cfg, optimizer, d)),
                                  member_data([cfg] * members))
    return sharding_lib.tree_shardings(abstract, layout.mesh, layout.param_rules,
                                       runs_axis=members is not None)


def make_init_state(cfg: RunConfig, optimizer: optax.GradientTransformation,
                    layout: sharding_lib.Layout | None = None, *, params: Any = None,
                    opt_state: Any = None):
    """``() -> TrainState``: a single run's :func:`init_state` (from ``params`` and ``opt_state``
    if given), placed on ``layout``'s shardings when given."""
    if params is not None:  # copies: the train step donates the state, not the caller's arrays
        check_params(params, cfg)
    if opt_state is not None and params is None:
        raise ConfigError("opt_state: starting from an optimizer state needs its params too")
    if layout is None:
        if params is not None:
            params, opt_state = jax.tree.map(lambda x: jnp.array(x, copy=True), (params, opt_state))
        return lambda: init_state(cfg, optimizer, params=params, opt_state=opt_state)
    shardings = state_shardings(cfg, optimizer, layout)
    if params is None:
        return jax.jit(lambda: init_state(cfg, optimizer), out_shardings=shardings)
    placed = jax.tree.map(_place, params, shardings.params)
    if opt_state is not None:  # the inner state's moments mirror the parameters
        opt_state = jax.tree.map(np.asarray, opt_state)
    init = jax.jit(lambda p, o: init_state(cfg, optimizer, params=p, opt_state=o),
                   out_shardings=shardings)
    return lambda: init(placed, opt_state)


def _place(x: Any, sharding) -> Array:
    """A copy of ``x`` as a global array on ``sharding``: a global array is resharded, a host (or
    local) array — the same on every process — is sliced onto the devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding, may_alias=False)
    return mesh_lib.put_global(np.asarray(x), sharding)
