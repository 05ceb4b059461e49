"""Training: ``TrainState``, a pure ``train_step``, and the loop that runs one ``RunConfig``.

Output directory layout (``out_dir``):

* ``config.json`` — the resolved config. A rerun into the same directory must use the same config.
* ``metrics.jsonl`` — one JSON object per row: ``step``, ``loss`` (mean training loss over the steps
  since the previous row), ``lr`` and ``grad_norm`` (at ``step``), ``tokens`` (seen so far),
  ``tokens_per_s`` (over the steps since the previous row, excluding compilation), ``wall_time_s``
  (cumulative, across resumes), and ``eval_loss`` on evaluation steps. Rows are written every
  ``log_every`` steps and at every evaluation, checkpoint and the last step.
* ``checkpoints/<step>/`` — orbax checkpoints (state + data iterator), every ``checkpoint_every`` steps
  and at the end. Rerunning the same command resumes from the newest complete one and reproduces the
  uninterrupted run exactly (bitwise on CPU).
* Only process 0 writes these files; on a mesh (``cfg.mesh``, see :mod:`jscale.sharding`) every
  process trains its share and takes part in the checkpoints.
* ``summary.json`` — written at the end: ``final_train_loss`` (mean training loss of the last
  ``FINAL_LOSS_STEPS`` optimizer steps — steps, not logged rows — or of every step of a shorter
  run), ``final_eval_loss`` (on ``eval_tokens`` validation tokens spread over the whole validation
  split), parameter counts, FLOPs, ``epochs`` (tokens seen / training tokens available),
  ``wall_time_s`` and ``diverged`` (with ``diverged_step``, the first step whose loss was NaN/inf or
  above ``RunConfig.divergence_threshold``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jscale import data as data_lib
from jscale import files, models, optim
from jscale import sharding as sharding_lib
from jscale.checkpoint import Checkpointer
from jscale.config import EPOCHS_WARN, ConfigError, RunConfig

Array = jax.Array

#: ``final_train_loss`` is the mean training loss of this many final optimizer steps (every step of
#: a shorter run): a fixed window, whatever ``log_every`` is.
FINAL_LOSS_STEPS = 10


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
                      stacklevel=2)
    return n


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training: a pytree, so it jits, vmaps and checkpoints."""

    step: Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any
    rng: Array  # uint32[2] raw PRNG key, for stochastic layers


def init_state(cfg: RunConfig, optimizer: optax.GradientTransformation) -> TrainState:
    """Fresh parameters and optimizer state, seeded by ``cfg.train.seed``."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(cfg.train.seed))
    params = models.init(init_key, cfg.model)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=rng)


def loss_fn(params: Any, batch: dict[str, Array], model_cfg: Any) -> tuple[Array, dict[str, Array]]:
    """Mean next-token cross-entropy (float32) plus every auxiliary ``*_loss`` the model reports."""
    logits_BTV, aux = models.apply(params, batch["inputs"], model_cfg,
                                   segment_ids_BT=batch.get("segment_ids"))
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), batch["targets"]).mean()
    total = ce + sum((v for k, v in aux.items() if k.endswith("_loss")), jnp.zeros((), jnp.float32))
    return total, {"ce_loss": ce, **aux}


def train_step(state: TrainState, batch: dict[str, Array], *, cfg: RunConfig,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update. Pure: jit it (``make_train_step``) or vmap it over runs."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, cfg.model)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": optim.current_lr(state.opt_state, state.step, cfg.optim), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_layout(cfg: RunConfig) -> sharding_lib.Layout | None:
    """The device layout ``cfg.mesh`` asks for, checked against ``cfg`` and the devices; ``None`` for
    the default mesh (every axis 1): the single-device path, no mesh and no constraints."""
    if sharding_lib.is_single_device(cfg.mesh):
        if jax.process_count() > 1:
            raise ConfigError(f"mesh: {jax.process_count()} processes are running but the mesh is "
                              "one device; set the mesh axes (e.g. --set mesh.data=-1)")
        return None
    sharding_lib.check_mesh(cfg)
    return sharding_lib.Layout(sharding_lib.make_mesh(cfg.mesh))


def state_shardings(cfg: RunConfig, optimizer: optax.GradientTransformation,
                    layout: sharding_lib.Layout) -> TrainState:
    """Shardings of the whole ``TrainState`` under ``layout``: parameters by their names' dims, the
    optimizer's moments like their parameters, everything else replicated."""
    abstract = jax.eval_shape(lambda: init_state(cfg, optimizer))
    return sharding_lib.tree_shardings(abstract, layout.mesh, layout.param_rules)


def make_init_state(cfg: RunConfig, optimizer: optax.GradientTransformation,
                    layout: sharding_lib.Layout | None = None):
    """``() -> TrainState``: :func:`init_state`, placed on ``layout``'s shardings when given."""
    if layout is None:
        return lambda: init_state(cfg, optimizer)
    return jax.jit(lambda: init_state(cfg, optimizer),
                   out_shardings=state_shardings(cfg, optimizer, layout))


def make_train_step(cfg: RunConfig, optimizer: optax.GradientTransformation,
                    layout: sharding_lib.Layout | None = None):
    """``train_step`` jitted for ``cfg``, donating the incoming state.

    With a ``layout``: state and batch come in (and the state goes out) with the rules' shardings,
    metrics come out replicated, and the models' activation constraints are active while tracing.
    """
    def step(state, batch):
        return train_step(state, batch, cfg=cfg, optimizer=optimizer)
    if layout is None:
        return jax.jit(step, donate_argnums=0)
    state_sh = state_shardings(cfg, optimizer, layout)
    return jax.jit(sharding_lib.traced_under(layout, step),
                   in_shardings=(state_sh, layout.batch_sharding()),
                   out_shardings=(state_sh, layout.replicated()), donate_argnums=0)


def make_eval_step(cfg: RunConfig, layout: sharding_lib.Layout | None = None,
                   params_sharding: Any = None):
    """Jitted ``(params, batch) -> mean cross-entropy`` (replicated under a ``layout``)."""
    def evaluate(params, batch):
        return loss_fn(params, batch, cfg.model)[1]["ce_loss"]
    if layout is None:
        return jax.jit(evaluate)
    return jax.jit(sharding_lib.traced_under(layout, evaluate),
                   in_shardings=(params_sharding, layout.batch_sharding()),
                   out_shardings=layout.replicated())


# ---------------------------------------------------------------------------------------------------
# files


#: Config fields a resumed run may change: where it runs (the checkpoint is restored onto the new
#: mesh), not what it computes.
RESUMABLE_CHANGES = ("mesh.",)


def _prepare_out_dir(cfg: RunConfig, out: Path, *, write: bool = True) -> None:
    if write:
        out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = RunConfig.from_dict(json.loads(cfg_path.read_text())).flat()
        new = cfg.flat()
        changed = [k for k in new if old.get(k) != new[k]]
        diff = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed
                if not k.startswith(RESUMABLE_CHANGES)]
        if diff:
            raise ConfigError(f"{out} holds a run with a different config ({'; '.join(diff)}); "
                              "rerun with the same settings to resume, or use a new --out")
        if changed and write:  # a new mesh: config.json records where the run goes on
            files.atomic_write_json(cfg_path, cfg.to_dict())
    elif write:
        files.atomic_write_json(cfg_path, cfg.to_dict())


# ---------------------------------------------------------------------------------------------------
# the loop


def train(cfg: RunConfig, out_dir: str | os.PathLike, *, quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` (resuming if it holds a checkpoint); return the summary dict.

    Raises :class:`~jscale.config.ConfigError` before any training when the config, the data or the
    output directory cannot work. A run whose ``summary.json`` already exists is not retrained.
    """
    out = Path(out_dir)
    layout = make_layout(cfg)
    primary = sharding_lib.is_primary()  # only process 0 writes files; every process checkpoints
    _prepare_out_dir(cfg, out, write=primary)
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())

    tc = cfg.train
    corpus = data_lib.load_corpus(cfg.data, cfg.model.vocab_size, tc.seq_len)
    check_epochs(cfg, corpus)
    eval_data = data_lib.eval_batches(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                      n_batches=tc.eval_batches)
    n_eval_tokens = data_lib.eval_tokens(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                         n_batches=tc.eval_batches)
    threshold = cfg.divergence_threshold
    optimizer = optim.make_optimizer(cfg.optim, tc.steps)
    step_fn = make_train_step(cfg, optimizer, layout)
    state = make_init_state(cfg, optimizer, layout)()
    if layout is None:
        eval_fn = make_eval_step(cfg)
        data_iter = iter(data_lib.train_dataset(corpus, seq_len=tc.seq_len,
                                                batch_size=tc.batch_size, seed=tc.seed))
        to_device, data_shards = dict, 1
    else:
        # Each process loads only the rows of the global batch its devices hold.
        eval_fn = make_eval_step(cfg, layout, jax.tree.map(lambda x: x.sharding, state.params))
        batch_sh = layout.batch_sharding()
        lo, hi = sharding_lib.local_rows(batch_sh, (tc.batch_size, tc.seq_len))
        data_shards = tc.batch_size // (hi - lo)
        data_iter = iter(data_lib.train_dataset(
            corpus, seq_len=tc.seq_len, batch_size=hi - lo, seed=tc.seed,
            shard_index=lo // (hi - lo), shard_count=data_shards))

        def to_device(local):
            return sharding_lib.global_batch(local, batch_sh, tc.batch_size)
        eval_data = [to_device({k: v[lo:hi] for k, v in b.items()}) for b in eval_data]

    ckpt = Checkpointer(out / "checkpoints", keep=tc.keep_checkpoints)
    start, prior_wall = 0, 0.0
    recent = deque(maxlen=FINAL_LOSS_STEPS)  # the last steps' training losses
    if (latest := ckpt.latest_step()) is not None:
        saved_shards = ckpt.read_meta(latest).get("data_shards", 1)
        if saved_shards != data_shards:
            raise ConfigError(f"mesh: the checkpoint at step {latest} in {out} was written with the "
                              f"batch loaded in {saved_shards} shard(s) across processes, this mesh "
                              f"loads it in {data_shards}; resume with as many processes splitting "
                              "the batch")
        state, meta = ckpt.restore(latest, state, data_iter)
        start, prior_wall = latest, float(meta["wall_time_s"])
        recent.extend(meta.get("recent_losses", []))
    metrics_path = out / "metrics.jsonl"
    rows = [r for r in files.read_jsonl(metrics_path) if r["step"] <= start]
    if primary:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    if quiet or not primary:
        pass
    elif layout is None and jax.device_count() > 1:
        print(f"jscale: training on 1 of {jax.device_count()} devices (the default mesh); set "
              "--set mesh.data=-1 (or fsdp/tensor) to use them all", file=sys.stderr)
    elif layout is not None:
        axes = " × ".join(f"{a}={n}" for a, n in layout.axis_sizes.items() if n > 1)
        print(f"jscale: mesh {axes} over {layout.mesh.size} devices"
              + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""),
              file=sys.stderr)
    tokens_per_step = tc.batch_size * tc.seq_len
    t0 = time.perf_counter()
    interval_start, interval_steps, pending = t0, 0, []
    diverged_step = None
    eval_loss = rows[-1].get("eval_loss") if rows and start == tc.steps else None
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=quiet or not primary or not sys.stderr.isatty())

    def evaluate(params) -> float:
        return float(np.mean([eval_fn(params, b) for b in eval_data]))

    with open(metrics_path if primary else os.devnull, "a") as metrics_file:
        for step in range(start + 1, tc.steps + 1):
            state, m = step_fn(state, to_device(next(data_iter)))
            pending.append(m)
            if step == start + 1:  # compilation: keep it out of tokens/s
                jax.block_until_ready(m)
                interval_start, interval_steps = time.perf_counter(), -1
            interval_steps += 1
            bar.update(1)
            is_last = step == tc.steps
            do_eval = is_last or (tc.eval_every and step % tc.eval_every == 0)
            do_ckpt = is_last or (tc.checkpoint_every and step % tc.checkpoint_every == 0)
            if not (do_eval or do_ckpt or step % tc.log_every == 0):
                continue
            host = jax.device_get(pending)
            losses = np.array([h["loss"] for h in host], np.float64)
            ok = healthy(losses, threshold)
            if not np.all(ok):
                diverged_step = step - len(host) + 1 + int(np.argmin(ok))
                break
            recent.extend(losses.tolist())
            now = time.perf_counter()
            row = {"step": step, "loss": float(losses.mean()), "lr": float(host[-1]["lr"]),
                   "grad_norm": float(host[-1]["grad_norm"]), "tokens": step * tokens_per_step,
                   "tokens_per_s": (interval_steps * tokens_per_step / (now - interval_start)
                                    if interval_steps > 0 else None),
                   "wall_time_s": prior_wall + now - t0}
            row.update({k: float(v) for k, v in host[-1].items() if k not in row and k != "ce_loss"})
            if do_eval:
                eval_loss = row["eval_loss"] = evaluate(state.params)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            rows.append(row)
            if do_ckpt:
                ckpt.save(step, state, data_iter, {"wall_time_s": row["wall_time_s"],
                                                   "data_shards": data_shards,
                                                   "recent_losses": list(recent)})
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s'] or 0:.3g}")
            pending, interval_start, interval_steps = [], time.perf_counter(), 0
    bar.close()
    ckpt.close()

    counts = models.count_params(cfg.model)
    fpt = models.flops_per_token(cfg.model, tc.seq_len)["training"]
    steps_done = diverged_step if diverged_step is not None else tc.steps
    summary = {
        "final_train_loss": float(np.mean(recent)) if recent and diverged_step is None else None,
        "final_eval_loss": eval_loss if diverged_step is None else None,
        "eval_tokens": n_eval_tokens,
        "n_params": counts["total"], "n_params_non_embedding": counts["non_embedding"],
        "flops_per_token": fpt, "steps": steps_done, "tokens": steps_done * tokens_per_step,
        "flops": fpt * steps_done * tokens_per_step,
        "epochs": data_lib.epochs(corpus, steps_done * tokens_per_step),
        "wall_time_s": prior_wall + time.perf_counter() - t0,
        "diverged": diverged_step is not None, "diverged_step": diverged_step,
    }
    if not primary:
        return summary
    files.atomic_write_json(out / "summary.json", summary)
    if not quiet:
        status = (f"DIVERGED at step {diverged_step}" if summary["diverged"] else
                  f"train loss {summary['final_train_loss']:.4f}, eval loss "
                  f"{summary['final_eval_loss']:.4f}")
        print(f"jscale: {out}: {status}, {summary['tokens']:,} tokens, "
              f"{summary['wall_time_s']:.1f} s", file=sys.stderr)
    return summary
