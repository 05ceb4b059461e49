"""Training one *group* of runs — runs that share every shape — as one program.

What may differ between the members of a group is data over a leading run axis R (see
:data:`R_FIELDS`): learning rate, weight decay, warmup, schedule length (``train.steps``), seed
(initialization and data order) and ``model.init_scale``. Everything else — shapes, dtypes, batch,
schedule *kind*, Adam's betas, logging cadence — is the group's signature.

Both strategies run the training core's member step (:func:`jscale.core.member_step`, the same
``train_step`` a single run uses) and log every member with :class:`jscale.records.RunLog`, the rows
``jscale train`` writes (timing fields aside), aux metrics included:

* ``"vmap"``: init and step ``vmap``-ed over R and jitted once for the group. With a mesh
  (``RunConfig.mesh``, see :mod:`jscale.sharding`) the R axis is sharded over the ``runs`` axis, so
  each device group trains its own members, and each member is itself sharded by the other axes
  (``data``/``fsdp`` split its batch, ``tensor`` its heads and FFN).
* ``"sequential"``: the un-batched step, jitted once for the group and called one member at a time.

Members with fewer steps than the longest stop updating after their own last step (their state is
frozen by a mask, the loop goes on for the others) and report metrics at their own last step. A member
whose loss turns NaN/inf or exceeds the divergence threshold (``RunConfig.divergence_threshold``, the
same rule as ``jscale train``) is frozen at its last healthy state and reported ``diverged``; masking
is per member, so the other members compute exactly what they would without it. The loop stops once
every member has diverged or finished.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jscale import core, optim, records
from jscale import data as data_lib
from jscale import mesh as mesh_lib
from jscale import sharding as sharding_lib
from jscale.config import ConfigError, RunConfig

#: Dotted config fields that may differ inside a group (data over R) and their canonical value in
#: the group signature.
R_FIELDS = {"optim.lr": 1.0, "optim.weight_decay": 0.0, "optim.warmup_steps": 0, "train.steps": 1,
            "train.seed": 0, "model.init_scale": 1.0, "train.flops_budget": None}


def signature(cfg: RunConfig) -> RunConfig:
    """``cfg`` with every R field set to its canonical value: equal signatures ⇔ same group."""
    keys = set(cfg.valid_keys())
    return cfg.override({k: v for k, v in R_FIELDS.items() if k in keys})


def _member_data(runs: list[RunConfig]) -> dict[str, np.ndarray]:
    """Per-member arrays ``[R]`` for the programs of the runs' group (:func:`jscale.core.member_data`
    relative to the group signature)."""
    return core.member_data(runs, signature(runs[0]))


@dataclasses.dataclass
class Programs:
    """The group's functions over a leading R axis: ``init(member_data) -> (state, alive)``,
    ``step(state, alive, batch, active) -> (state, alive, metrics)``, ``evaluate(state, batch)``."""

    init: Callable
    step: Callable
    evaluate: Callable
    traces: list  # one entry per trace of the member step (= compilations of the group's step)
    layout: sharding_lib.Layout | None = None  # the programs' inputs are global arrays on it


def build_programs(common: RunConfig, strategy: str,
                   layout: sharding_lib.Layout | None = None) -> Programs:
    """Jitted init / step / eval for ``strategy`` ("vmap" or "sequential") on ``common``'s shapes;
    with a ``layout`` (vmap only), sharded over its mesh: R over ``runs``, the rest by the rules."""
    optimizer = optim.make_optimizer(common.optim, common.train.steps)
    traces: list = []

    def init_member(d):
        return core.init_state(common, optimizer, d), jnp.ones((), bool)

    def step_member(state, alive, batch, active):
        traces.append(1)
        return core.member_step(state, alive, batch, active, cfg=common, optimizer=optimizer)

    def eval_member(state, batch):
        return core.eval_loss(state, batch, common)

    if strategy == "vmap":
        if layout is not None:
            return _sharded_programs(common, optimizer, layout, init_member, step_member,
                                     eval_member, traces)
        init, step = jax.vmap(init_member), jax.vmap(step_member)
        evaluate = jax.vmap(eval_member, in_axes=(0, None))
    elif strategy == "sequential":  # the un-batched step, R = 1 at a time
        def unbatched(fn, n_batched):
            def wrapped(*args):
                args = [jax.tree.map(lambda x: x[0], a) if i < n_batched else a
                        for i, a in enumerate(args)]
                return jax.tree.map(lambda x: x[None], fn(*args))
            return wrapped
        init, step = unbatched(init_member, 1), unbatched(step_member, 4)
        evaluate = unbatched(eval_member, 1)
    else:
        raise ConfigError(f"strategy: must be 'vmap' or 'sequential' (got {strategy!r})")
    if layout is not None:
        raise ConfigError("strategy: 'sequential' trains one member at a time on one device; with "
                          "a mesh use 'vmap' or 'auto'")
    return Programs(init=jax.jit(init), step=jax.jit(step, donate_argnums=(0, 1)),
                    evaluate=jax.jit(evaluate), traces=traces)


def _sharded_programs(common: RunConfig, optimizer, layout: sharding_lib.Layout, init_member,
                      step_member, eval_member, traces: list) -> Programs:
    """The vmapped programs jitted with the layout's shardings: members over ``runs`` (the vmap's
    ``spmd_axis_name``, so activation constraints inside a member gain the R axis), parameters and
    optimizer state by their names, batches ``[R, B, T]`` over ``runs`` and ``data × fsdp``."""
    runs = layout.sharding(P("runs"))
    state_sh = core.state_shardings(common, optimizer, layout, members=layout.axis_sizes["runs"])
    step = sharding_lib.traced_under(layout, jax.vmap(step_member, spmd_axis_name="runs"))
    evaluate = sharding_lib.traced_under(
        layout, jax.vmap(eval_member, in_axes=(0, None), spmd_axis_name="runs"))
    return Programs(
        init=jax.jit(jax.vmap(init_member), in_shardings=(runs,), out_shardings=(state_sh, runs)),
        step=jax.jit(step, in_shardings=(state_sh, runs, layout.batch_sharding(runs_axis=True), runs),
                     out_shardings=(state_sh, runs, layout.replicated()), donate_argnums=(0, 1)),
        evaluate=jax.jit(evaluate, in_shardings=(state_sh, layout.batch_sharding()),
                         out_shardings=layout.replicated()),
        traces=traces, layout=layout)


def _due(cfg: RunConfig, step: int) -> tuple[bool, bool]:
    """(row due, eval due) for a member at ``step`` (1-based)."""
    due = records.due(cfg.train, step)
    return due.row, due.eval


def run_group(members: list[RunConfig], programs: Programs, corpus: data_lib.Corpus,
              *, on_step: Callable[[float], None] | None = None
              ) -> tuple[list[records.RunLog], float]:
    """Train ``members`` (one chunk of R) with ``programs``; returns their logs and the wall time.

    With sharded programs, R is padded to a multiple of the ``runs`` axis with inactive copies.
    ``on_step(fraction_of_runs_done)`` is called after every step.
    """
    t0 = time.perf_counter()
    real = len(members)
    layout = programs.layout
    if layout is not None:
        members = members + [members[0]] * (-real % layout.axis_sizes["runs"])
    R, tc = len(members), members[0].train

    runs_sharding = None if layout is None else layout.sharding(P("runs"))

    def put(x, sharding=None):
        # Every process holds the whole host array; each device takes its slice.
        if layout is None:
            return x
        return jax.tree.map(lambda a: mesh_lib.put_global(a, sharding or runs_sharding), x)

    state, alive = programs.init(put(_member_data(members)))
    # Multi-process: a process reads only the data of the members its devices hold (the others'
    # rows of the host batch stay zeros and are never transferred).
    local = np.ones(R, bool) if layout is None else _held_members(runs_sharding, R)
    iters = [iter(data_lib.train_dataset(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                         seed=m.train.seed)) if held else None
             for m, held in zip(members, local, strict=True)]
    evals = data_lib.eval_batches(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                  n_batches=tc.eval_batches)
    batch_sharding = None
    if layout is not None:
        evals = [put(b, layout.batch_sharding()) for b in evals]
        batch_sharding = layout.batch_sharding(runs_axis=True)
    logs = [records.RunLog(m) for m in members]
    steps = np.array([m.train.steps for m in members])
    steps[real:] = 0  # padding members never train
    last_batch = [None] * R
    pending: list[tuple[int, Any]] = []
    for step in range(1, int(steps.max()) + 1):
        active = steps >= step
        for r in np.flatnonzero(local):
            if (active[r] and logs[r].running) or last_batch[r] is None:
                last_batch[r] = next(iters[r])
        template = next(b for b in last_batch if b is not None)
        batch = {k: np.stack([template[k] * 0 if b is None else b[k] for b in last_batch])
                 for k in template}
        batch = put(batch, batch_sharding)
        state, alive, metrics = programs.step(state, alive, batch, put(active))
        pending.append((step, metrics))
        dues = [_due(m, step) if active[r] else (False, False) for r, m in enumerate(members)]
        if on_step is not None:
            on_step(float(np.sum(1.0 / steps[:real][active[:real]])))
        if not any(row or ev for row, ev in dues):
            continue
        eval_R = None
        if any(ev for _, ev in dues):
            eval_R = np.mean([np.asarray(programs.evaluate(state, b)) for b in evals], axis=0)
        host = jax.device_get(pending)
        for s, m in host:
            for r in range(real):
                if s > steps[r]:
                    continue
                row_due, eval_due = _due(members[r], s)
                ev = float(eval_R[r]) if (s == step and eval_due and eval_R is not None) else None
                if logs[r].add(s, {k: v[r] for k, v in m.items()}) and (row_due or ev is not None):
                    logs[r].row(s, eval_loss=ev)
        pending = []
        if not any(logs[r].running and steps[r] > step for r in range(real)):
            break  # every member has diverged or finished: nothing left to train
    return logs[:real], time.perf_counter() - t0


def _held_members(sharding, R: int) -> np.ndarray:
    """``[R]`` bool: which members' slices of a run-sharded array live on this process's devices."""
    held = np.zeros(R, bool)
    for idx in sharding.addressable_devices_indices_map((R,)).values():
        held[idx[0] if idx else slice(None)] = True
    return held


def make_layout(cfg: RunConfig) -> sharding_lib.Layout | None:
    """The layout ``cfg.mesh`` asks for (checked against ``cfg``; the ``runs`` axis allowed), or
    ``None`` for the default one-device mesh (:func:`jscale.core.make_layout`)."""
    return core.make_layout(cfg, sweep=True)
