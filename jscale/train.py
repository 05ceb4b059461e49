"""The single-run driver: the loop that trains one ``RunConfig`` over the training core
(:mod:`jscale.core`; rows and summary: :mod:`jscale.records`).

Output directory layout (``out_dir``):

* ``config.json`` — the resolved config. A rerun into the same directory must use the same config.
* ``metrics.jsonl`` — one JSON object per row: ``step``, ``loss`` (mean training loss over the steps
  since the previous row), ``lr`` and ``grad_norm`` (at ``step``), ``tokens`` (seen so far),
  ``tokens_per_s`` (over the steps since the previous row, excluding compilation), ``wall_time_s``
  (cumulative, across resumes), every auxiliary value the model family reports, and ``eval_loss``
  on evaluation steps (see :mod:`jscale.records`). Rows are written every ``log_every`` steps and
  at every evaluation, checkpoint and the last step.
* ``checkpoints/<step>/`` — orbax checkpoints (the state, model state included, and the data
  iterator), every ``checkpoint_every`` steps and at the end. Rerunning the same command resumes
  from the newest complete one and reproduces the uninterrupted run exactly (bitwise on CPU).
* Only process 0 writes these files; on a mesh (``cfg.mesh``, see :mod:`jscale.sharding`) every
  process trains its share and takes part in the checkpoints.
* ``lineage.json`` — a grown run only (``cfg.growth``, :func:`grow_start`; ``jscale train
  --init-from RUN --grow OP``), written before its first step: :func:`jscale.records.lineage` —
  ``source_run``, ``source_step``, ``growth_op``, ``source_tokens``, ``source_flops``,
  ``growth_flops``. A rerun resumes from the run's own checkpoint, not from the source.
* ``summary.json`` — written at the end (:func:`jscale.records.summary`): ``final_train_loss`` (mean
  training loss of the last ``FINAL_LOSS_STEPS`` optimizer steps — steps, not logged rows — or of
  every step of a shorter run), ``final_eval_loss`` (on ``eval_tokens`` validation tokens spread
  over the whole validation split), ``min_eval_loss``, parameter counts, FLOPs, ``epochs`` (tokens
  seen / training tokens available), ``wall_time_s`` and ``diverged`` (with ``diverged_step``, the
  first step whose loss was NaN/inf or above ``RunConfig.divergence_threshold``); for a grown run
  also its lineage, ``total_tokens`` and ``total_flops`` (source included,
  :func:`jscale.records.with_lineage`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from jscale import configpath, core, files, growth, models, optim, records
from jscale import data as data_lib
from jscale import mesh as mesh_lib
from jscale import sharding as sharding_lib
from jscale.checkpoint import Checkpointer
from jscale.config import ConfigError, GrowthConfig, RunConfig

# The single-run names of the core, also importable from here:
from jscale.core import TrainState, init_state, loss_fn, make_init_state, make_layout  # noqa: F401


def make_train_step(cfg: RunConfig, optimizer: optax.GradientTransformation,
                    layout: sharding_lib.Layout | None = None):
    """:func:`jscale.core.train_step` jitted for ``cfg``, donating the incoming state.

    With a ``layout``: state and batch come in (and the state goes out) with the rules' shardings,
    metrics come out replicated, and the models' activation constraints are active while tracing.
    """
    def step(state, batch):
        return core.train_step(state, batch, cfg=cfg, optimizer=optimizer)
    if layout is None:
        return jax.jit(step, donate_argnums=0)
    state_sh = core.state_shardings(cfg, optimizer, layout)
    return jax.jit(sharding_lib.traced_under(layout, step),
                   in_shardings=(state_sh, layout.batch_sharding()),
                   out_shardings=(state_sh, layout.replicated()), donate_argnums=0)


def make_eval_step(cfg: RunConfig, layout: sharding_lib.Layout | None = None,
                   state_sharding: Any = None):
    """Jitted ``(state, batch) -> mean cross-entropy`` (replicated under a ``layout``)."""
    def evaluate(state, batch):
        return core.eval_loss(state, batch, cfg)
    if layout is None:
        return jax.jit(evaluate)
    return jax.jit(sharding_lib.traced_under(layout, evaluate),
                   in_shardings=(state_sharding, layout.batch_sharding()),
                   out_shardings=layout.replicated())


def load_state(cfg: RunConfig, out_dir: str | os.PathLike, step: int | None = None) -> TrainState:
    """The state in checkpoint ``step`` (default: the newest) of ``cfg``'s run in ``out_dir``, on
    one device — e.g. its ``params`` to start another run from (``train(..., init_params=)``)."""
    ckpt = Checkpointer(Path(out_dir) / "checkpoints")
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{out_dir}: no checkpoint to load")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            jax.eval_shape(lambda: init_state(
                                cfg, optim.make_optimizer(cfg.optim, cfg.train.steps))))
        return ckpt.restore_state(step, like)
    finally:
        ckpt.close()


def init_params_from(source: str | os.PathLike, cfg: RunConfig) -> Any:
    """Parameters for ``cfg``'s model started from a trained checkpoint (two-stage training, e.g.
    a ParScale model from its dense base): ``source`` is a jscale run directory (``config.json``
    and ``checkpoints/``: its newest checkpoint) or a Hugging Face–format directory
    (``config.json`` and ``*.safetensors``, read by :func:`jscale.hf.load`).

    Every leaf of the source is copied into the same place of ``cfg``'s tree (cast to its dtype);
    the leaves the source lacks (ParScale's prefixes and aggregator) are ``cfg``'s own fresh init
    (``train.seed``). Raises :class:`ConfigError` when a shape differs (naming the leaf and both
    shapes) or the source has a leaf ``cfg``'s model lacks. The source's non-gradient model state
    (an MoE router bias) is not carried over.
    """
    src = Path(source)
    if (src / "config.json").exists() and any(src.glob("*.safetensors")):
        from jscale import hf
        src_model, src_params = hf.load(src)
    elif (src / "config.json").exists() and (src / "checkpoints").is_dir():
        src_cfg = RunConfig.from_dict(json.loads((src / "config.json").read_text()))
        src_model, src_params = src_cfg.model, load_state(src_cfg, src).params
    else:
        raise ConfigError(f"init-from {src}: neither a jscale run directory (config.json and "
                          "checkpoints/) nor a Hugging Face checkpoint (config.json and "
                          "*.safetensors)")
    key = jax.random.split(jax.random.PRNGKey(cfg.train.seed))[0]  # init_state's init key
    fresh = models.init(key, cfg.model)
    got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(src_params)}
    extra = set(got) - {jax.tree_util.keystr(p) for p, _ in
                        jax.tree_util.tree_leaves_with_path(fresh)}
    if extra:
        raise ConfigError(f"init-from {src}: the checkpoint has {sorted(extra)[:4]}, which this "
                          f"model ({models.describe(cfg.model)}) lacks: it is not this model's base")

    def take(path, x):
        name = jax.tree_util.keystr(path)
        if name not in got:
            return x
        y = got[name]
        if tuple(np.shape(y)) != x.shape:
            raise ConfigError(
                f"init-from {src}: {name} is {list(np.shape(y))} in the checkpoint "
                f"({models.describe(src_model)}) but {list(x.shape)} in this model "
                f"({models.describe(cfg.model)})")
        return jax.numpy.asarray(y, x.dtype)
    return jax.tree_util.tree_map_with_path(take, fresh)


def _source_run(source: str | os.PathLike, field: str = "--init-from") -> tuple[Path, RunConfig]:
    """A growth source's directory and config; refuses what cannot be grown."""
    src = Path(source).resolve()
    if any(src.glob("*.safetensors")):
        raise ConfigError(f"{field} {src}: growth grows a jscale run directory (config.json and "
                          "checkpoints/), whose training compute the grown run records; a Hugging "
                          "Face checkpoint has none (use it without --grow)")
    if not ((src / "config.json").exists() and (src / "checkpoints").is_dir()):
        raise ConfigError(f"{field} {src}: not a jscale run directory (config.json and "
                          "checkpoints/): growth grows a run's newest checkpoint")
    if not any(p.name.isdigit() for p in (src / "checkpoints").iterdir()):  # orbax: <step>/
        raise ConfigError(f"{field} {src}: the run has no complete checkpoint to grow yet")
    return src, RunConfig.from_dict(json.loads((src / "config.json").read_text()))


def _text(value: Any) -> str:
    """``value`` as ``--set`` text that :meth:`RunConfig.override` reads back."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(_text(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def with_growth(cfg: RunConfig, source: str | os.PathLike, grow: str, *, grow_steps: int = 0,
                grow_optimizer_state: bool = False, learn_steps: int | None = None) -> RunConfig:
    """``cfg`` with the :class:`~jscale.config.GrowthConfig` that describes growing the jscale run in
    ``source`` by ``grow`` (``OP[:G[:PLACEMENT]]``; ``jscale train --init-from RUN --grow OP``):
    ``source_steps`` the source's ``train.steps`` and ``source`` the model fields in which the
    source differs from this run (beyond the depth factor). Raises :class:`ConfigError` naming
    ``--grow`` and both shapes when the operator cannot make this run's model from the source's."""
    spec = growth.parse_spec(grow)
    src, src_cfg = _source_run(source)
    spec.check(src_cfg.model, cfg.model)
    target = configpath.flatten(cfg.model, "model")
    if spec.factor is not None:
        derived_n = {"model.n_layers": cfg.model.n_layers // spec.factor}
        if getattr(cfg.model, "moe", None) is not None:
            derived_n["model.moe.first_dense_layers"] = (cfg.model.moe.first_dense_layers
                                                         // spec.factor)
        target.update(derived_n)
    items = tuple(f"{k}={_text(v)}" for k, v in configpath.flatten(src_cfg.model, "model").items()
                  if k not in target or target[k] != v)
    try:
        out = dataclasses.replace(cfg, growth=GrowthConfig(
            op=grow, source_steps=src_cfg.train.steps, source=items, grow_steps=grow_steps,
            grow_optimizer_state=grow_optimizer_state, learn_steps=learn_steps))
    except ConfigError as e:
        raise ConfigError(f"--grow: {grow!r} cannot grow {src} into this run: {e} (source: "
                          f"{models.describe(src_cfg.model)}; this run: "
                          f"{models.describe(cfg.model)})") from None
    if out.source_config().model != src_cfg.model:
        raise ConfigError(f"--init-from {src}: its model cannot be written as growth.source "
                          f"overrides of this run ({', '.join(items)})")
    return out


def grow_start(cfg: RunConfig, source: str | os.PathLike, *,
               batches: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """``(params, opt_state, lineage)`` that start the grown run ``cfg`` (``cfg.growth`` set) from
    the newest checkpoint of the jscale run in ``source``, whose model must be the source model
    ``cfg.growth`` describes: the parameters grown by ``growth.op``, the Adam moments grown with
    them when ``growth.grow_optimizer_state`` (else ``opt_state`` is ``None``: fresh), and where they
    come from (:func:`jscale.records.lineage`). The random choices (``direct_width``'s copies,
    ``random``'s new parameters, ``learn``'s width init) use a key from ``cfg.train.seed``.
    ``learn`` trains its expansion on ``batches`` (an iterator of training batches; default: this
    run's training data with the seed folded, so it does not replay the run's own order). The
    source's non-gradient model state (an MoE router bias) is not carried over."""
    g = cfg.growth
    if g is None:
        raise ConfigError("growth: the run has no growth section; nothing to grow")
    src, src_cfg = _source_run(source, "growth source")
    want = cfg.source_config().model
    if src_cfg.model != want:
        raise ConfigError(f"growth.source: {src} holds a {models.describe(src_cfg.model)} model; "
                          f"this run's growth section describes a {models.describe(want)} source")
    spec = growth.parse_spec(g.op, field="growth.op")
    state = load_state(src_cfg, src)
    step = int(state.step)
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1)  # the growth key
    options, growth_flops = dict(spec.options), 0.0
    if spec.op == "learn":
        steps = g.learn_steps or g.DEFAULT_LEARN_STEPS
        if batches is None:
            batches = _learn_batches(cfg)
        options.update(batches=batches, steps=steps, lr=cfg.optim.lr)
        tokens = steps * cfg.train.batch_size * cfg.train.seq_len
        growth_flops = models.flops_per_token(cfg.model, cfg.train.seq_len)["training"] * tokens
    try:
        params = growth.grow(state.params, src_cfg.model, cfg.model, spec.op, key=key, **options)
    except ConfigError as e:
        raise ConfigError(f"growth.op: {str(spec)!r} cannot grow {src} into this run: {e} "
                          f"(source: {models.describe(src_cfg.model)}; this run: "
                          f"{models.describe(cfg.model)})") from None
    opt_state = None
    if g.grow_optimizer_state:
        opt_state = growth.grow_optimizer_state(state.opt_state, state.params, src_cfg.model,
                                                cfg.model, spec.op, key=key, **spec.options)
    src_lineage = (json.loads((src / "lineage.json").read_text())
                   if (src / "lineage.json").exists() else None)
    return params, opt_state, records.lineage(src_cfg, step, source_run=str(src),
                                              growth_op=str(spec), source_lineage=src_lineage,
                                              growth_flops=growth_flops)


def _learn_batches(cfg: RunConfig):
    """G_learn's batches: the run's training split, in an order of their own (seed folded)."""
    tc = cfg.train
    corpus = data_lib.load_corpus(cfg.data, cfg.model.vocab_size, tc.seq_len)
    seed = int(jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(tc.seed), 2), (), 0,
                                  2**30))
    return iter(data_lib.train_dataset(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                       seed=seed))


# ---------------------------------------------------------------------------------------------------
# the loop's parts


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


def _prepare_lineage(out: Path, lineage: dict[str, Any] | None, *, finished: bool,
                     write: bool) -> dict[str, Any] | None:
    """The run's lineage: ``out/lineage.json`` checked against ``lineage`` (a rerun of a grown run
    must bring the same one; a finished run may bring none), or written from it."""
    path, new = out / "lineage.json", None if lineage is None else json.loads(json.dumps(lineage))
    if path.exists():
        old = json.loads(path.read_text())
        if new is None and not finished:
            raise ConfigError(f"{out} holds a run grown from {old['source_run']} (--grow "
                              f"{old['growth_op']}); rerun with the same --init-from and --grow")
        if new is not None and new != old:
            diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
            raise ConfigError(f"{out} holds a run grown with another lineage ({'; '.join(diff)}); "
                              "rerun with the same --init-from and --grow, or use a new --out")
        return old
    if new is not None and (finished or (out / "metrics.jsonl").exists()):
        raise ConfigError(f"{out} holds a run that was not grown (no lineage.json); use a new "
                          "--out for the grown run")
    if new is not None and write:
        files.atomic_write_json(path, new)
    return new


class _Data:
    """The run's corpus (checked for epochs), its training batches — each process loads only the
    rows of the global batch its devices hold — and its evaluation batches, on ``layout``."""

    def __init__(self, cfg: RunConfig, layout: sharding_lib.Layout | None):
        tc = cfg.train
        self.corpus = data_lib.load_corpus(cfg.data, cfg.model.vocab_size, tc.seq_len)
        core.check_epochs(cfg, self.corpus)
        evals = data_lib.eval_batches(self.corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                      n_batches=tc.eval_batches)
        lo, hi, self.to_device = 0, tc.batch_size, dict
        if layout is not None:
            batch_sh = layout.batch_sharding()
            lo, hi = mesh_lib.local_rows(batch_sh, (tc.batch_size, tc.seq_len))

            def to_device(local):
                return mesh_lib.global_batch(local, batch_sh, tc.batch_size)
            self.to_device = to_device
            evals = [to_device({k: v[lo:hi] for k, v in b.items()}) for b in evals]
        self.evals, self.shards = evals, tc.batch_size // (hi - lo)
        self.iterator = iter(data_lib.train_dataset(
            self.corpus, seq_len=tc.seq_len, batch_size=hi - lo, seed=tc.seed,
            **({} if layout is None else {"shard_index": lo // (hi - lo),
                                          "shard_count": self.shards})))

    def next(self):
        return self.to_device(next(self.iterator))

    def evaluate(self, eval_fn, state) -> float:
        return float(np.mean([eval_fn(state, b) for b in self.evals]))


def _resume(cfg: RunConfig, out: Path, ckpt: Checkpointer, state: TrainState, data: _Data,
            primary: bool) -> tuple[TrainState, int, float, records.RunLog]:
    """From the newest checkpoint, if any: ``(state, its step, wall time so far, the log)``;
    ``metrics.jsonl`` is cut back to the checkpoint's step."""
    start, prior_wall, recent = 0, 0.0, []
    if (latest := ckpt.latest_step()) is not None:
        saved_shards = ckpt.read_meta(latest).get("data_shards", 1)
        if saved_shards != data.shards:
            raise ConfigError(f"mesh: the checkpoint at step {latest} in {out} was written with the "
                              f"batch loaded in {saved_shards} shard(s) across processes, this mesh "
                              f"loads it in {data.shards}; resume with as many processes splitting "
                              "the batch")
        state, meta = ckpt.restore(latest, state, data.iterator)
        start, prior_wall = latest, float(meta["wall_time_s"])
        recent = meta.get("recent_losses", [])
    metrics_path = out / "metrics.jsonl"
    rows = [r for r in files.read_jsonl(metrics_path) if r["step"] <= start]
    if primary:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return state, start, prior_wall, records.RunLog(cfg, rows, recent)


def _announce(layout: sharding_lib.Layout | None) -> None:
    if layout is None and jax.device_count() > 1:
        print(f"jscale: training on 1 of {jax.device_count()} devices (the default mesh); set "
              "--set mesh.data=-1 (or fsdp/tensor) to use them all", file=sys.stderr)
    elif layout is not None:
        axes = " × ".join(f"{a}={n}" for a, n in layout.axis_sizes.items() if n > 1)
        print(f"jscale: mesh {axes} over {layout.mesh.size} devices"
              + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""),
              file=sys.stderr)


class _Clock:
    """Wall time (across resumes) and tokens/s over each row's steps, compilation excluded."""

    def __init__(self, prior_wall: float, tokens_per_step: int):
        self.t0 = self.start = time.perf_counter()
        self.prior, self.tokens_per_step, self.steps = prior_wall, tokens_per_step, 0

    def tick(self, metrics, *, first: bool) -> None:
        if first:  # compilation: keep it out of tokens/s
            jax.block_until_ready(metrics)
            self.start, self.steps = time.perf_counter(), -1
        self.steps += 1

    def lap(self) -> dict[str, float | None]:
        now = time.perf_counter()
        return {"tokens_per_s": (self.steps * self.tokens_per_step / (now - self.start)
                                 if self.steps > 0 else None),
                "wall_time_s": self.prior + now - self.t0}

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def total(self) -> float:
        return self.prior + time.perf_counter() - self.t0


def _report(out: Path, summary: dict[str, Any]) -> None:
    status = (f"DIVERGED at step {summary['diverged_step']}" if summary["diverged"] else
              f"train loss {summary['final_train_loss']:.4f}, eval loss "
              f"{summary['final_eval_loss']:.4f}")
    print(f"jscale: {out}: {status}, {summary['tokens']:,} tokens, "
          f"{summary['wall_time_s']:.1f} s", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# the loop


def train(cfg: RunConfig, out_dir: str | os.PathLike, *, quiet: bool = False,
          init_params: Any = None, lineage: dict[str, Any] | None = None,
          grow_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` (resuming if it holds a checkpoint); return the summary dict.

    ``init_params``: start from these parameters (the family's tree, e.g. another run's
    :func:`load_state` ``.params``) instead of a fresh init; the optimizer state is fresh, and a
    resumed run continues from its own checkpoint. A grown run (``cfg.growth`` set, e.g. by
    :func:`with_growth`) needs ``grow_from``, the source run's directory: on its first start it is
    grown from there (:func:`grow_start`), its ``lineage.json`` written before the first step; a
    rerun resumes from its own checkpoints and keeps the recorded lineage. ``lineage`` (with
    ``init_params`` grown by hand): recorded in ``lineage.json`` the same way. The summary of a
    grown run carries the lineage and the total compute (:func:`jscale.records.with_lineage`).
    Raises :class:`~jscale.config.ConfigError` before any training when the config, the data or
    the output directory cannot work. A run whose ``summary.json`` already exists is not retrained.
    """
    out, tc = Path(out_dir), cfg.train
    if cfg.growth is not None and grow_from is None and not (out / "lineage.json").exists():
        raise ConfigError("growth: a grown run needs the source run's directory to grow from "
                          "(train(..., grow_from=DIR); jscale train --init-from DIR --grow OP)")
    if cfg.growth is None and grow_from is not None:
        raise ConfigError("grow_from: given for a run with no growth section (set growth, e.g. "
                          "with jscale.train.with_growth)")
    if cfg.growth is not None and (init_params is not None or lineage is not None):
        raise ConfigError("init_params: a run with a growth section grows its own start from "
                          "grow_from; pass neither init_params nor lineage")
    layout = make_layout(cfg)
    primary = mesh_lib.is_primary()  # only process 0 writes files; every process checkpoints
    _prepare_out_dir(cfg, out, write=primary)
    finished = (out / "summary.json").exists()
    init_opt = None
    if cfg.growth is not None:
        ckpts = out / "checkpoints"
        started = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
        if (out / "lineage.json").exists() and (started or finished):
            lineage = json.loads((out / "lineage.json").read_text())
        else:
            init_params, init_opt, lineage = grow_start(cfg, grow_from)
            if primary:
                files.atomic_write_json(out / "lineage.json", lineage)
    else:
        lineage = _prepare_lineage(out, lineage, finished=finished, write=primary)
    if finished:
        return json.loads((out / "summary.json").read_text())
    data = _Data(cfg, layout)
    optimizer = optim.make_optimizer(cfg.optim, tc.steps)
    step_fn = make_train_step(cfg, optimizer, layout)
    state = make_init_state(cfg, optimizer, layout, params=init_params, opt_state=init_opt)()
    eval_fn = make_eval_step(cfg, layout, jax.tree.map(lambda x: x.sharding, state))
    ckpt = Checkpointer(out / "checkpoints", keep=tc.keep_checkpoints)
    state, start, prior_wall, log = _resume(cfg, out, ckpt, state, data, primary)
    if not quiet and primary:
        _announce(layout)
    clock, pending = _Clock(prior_wall, tc.batch_size * tc.seq_len), []
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=quiet or not primary or not sys.stderr.isatty())
    with open(out / "metrics.jsonl" if primary else os.devnull, "a") as metrics_file:
        for step in range(start + 1, tc.steps + 1):
            state, m = step_fn(state, data.next())
            pending.append((step, m))
            clock.tick(m, first=step == start + 1)
            bar.update(1)
            if not any(due := records.due(tc, step)):
                continue
            if not log.extend(jax.device_get(pending)):
                break  # diverged: log.diverged_step is the first unhealthy step
            timing = clock.lap()
            row = log.row(step, eval_loss=data.evaluate(eval_fn, state) if due.eval else None,
                          **timing)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            if due.checkpoint:
                ckpt.save(step, state, data.iterator, {"wall_time_s": row["wall_time_s"],
                                                       "data_shards": data.shards,
                                                       "recent_losses": list(log.recent)})
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s'] or 0:.3g}")
            pending = []
            clock.restart()
    bar.close()
    ckpt.close()
    summary = records.summary(cfg, log, data.corpus, wall_time_s=clock.total())
    if lineage is not None:
        summary = records.with_lineage(summary, lineage)
    if primary:
        files.atomic_write_json(out / "summary.json", summary)
        if not quiet:
            _report(out, summary)
    return summary
