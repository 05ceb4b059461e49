"""What a run records, the same for ``jscale train`` and for every member of a sweep: the logging
cadence (:func:`due`), the rows of ``metrics.jsonl`` / a sweep curve and the divergence rule
(:class:`RunLog`), the summary (:func:`summary`: ``summary.json``, and the core of a sweep's
result row) and, for a run grown from another (:mod:`jscale.growth`), its lineage
(:func:`lineage`, :func:`with_lineage`).

A row: ``step``, ``loss`` (mean training loss over the steps since the previous row), ``lr`` and
``grad_norm`` (at ``step``), ``tokens`` (seen so far), the driver's timing fields (``jscale train``:
``tokens_per_s``, ``wall_time_s``), every auxiliary value the model family reports (its ``aux``,
at ``step``; ``ce_loss`` is left out, it is ``loss`` less the aux losses) and, on evaluation steps,
``eval_loss``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from jscale import data as data_lib
from jscale import models
from jscale.config import RunConfig, TrainConfig
from jscale.core import healthy

#: ``final_train_loss`` is the mean training loss of this many final optimizer steps (every step of
#: a shorter run): a fixed window, whatever ``log_every`` is.
FINAL_LOSS_STEPS = 10

#: Step metrics that are not copied into rows as aux values (``loss`` is).
NOT_IN_ROWS = ("ce_loss",)


class Due(NamedTuple):
    """What is due after a step: a row, an evaluation (with its row), a checkpoint."""

    row: bool
    eval: bool
    checkpoint: bool


def due(tc: TrainConfig, step: int) -> Due:
    """The cadence at ``step`` (1-based): rows every ``log_every`` steps, evaluations every
    ``eval_every``, checkpoints every ``checkpoint_every`` (0: never), all three at the last step."""
    last = step == tc.steps
    return Due(row=last or step % tc.log_every == 0,
               eval=last or bool(tc.eval_every and step % tc.eval_every == 0),
               checkpoint=last or bool(tc.checkpoint_every and step % tc.checkpoint_every == 0))


class RunLog:
    """One run's rows, its last ``FINAL_LOSS_STEPS`` step losses and its divergence.

    Feed it every step's host metrics with :meth:`add` (in step order); close a row with :meth:`row`.
    ``rows`` and ``recent`` resume a log (the rows already written, the recent losses saved in a
    checkpoint).
    """

    def __init__(self, cfg: RunConfig, rows: Iterable[dict] = (), recent: Iterable[float] = ()):
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.threshold = cfg.divergence_threshold
        self.rows: list[dict[str, Any]] = list(rows)
        self.recent: deque[float] = deque(recent, maxlen=FINAL_LOSS_STEPS)
        self.diverged_step: int | None = None
        self._losses: list[float] = []  # since the last row
        self._last: Mapping[str, Any] = {}  # the last healthy step's metrics

    @property
    def running(self) -> bool:
        """Not diverged."""
        return self.diverged_step is None

    def add(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Record one step's metrics; ``False`` (and nothing recorded) once the run has diverged —
        at this step if its loss is NaN/inf or above the divergence threshold."""
        if not self.running:
            return False
        loss = float(metrics["loss"])
        if not healthy(loss, self.threshold):
            self.diverged_step = step
            return False
        self._losses.append(loss)
        self.recent.append(loss)
        self._last = metrics
        return True

    def extend(self, steps: Iterable[tuple[int, Mapping[str, Any]]]) -> bool:
        """:meth:`add` each ``(step, metrics)``; ``False`` at the first unhealthy one."""
        return all(self.add(s, m) for s, m in steps)

    def row(self, step: int, *, eval_loss: float | None = None, **timing: Any) -> dict[str, Any]:
        """Close the interval since the previous row: append and return its row (see the module
        docstring); ``timing`` fields come after ``tokens``."""
        m = self._last
        row = {"step": step, "loss": float(np.mean(self._losses)), "lr": float(m["lr"]),
               "grad_norm": float(m["grad_norm"]), "tokens": step * self.tokens_per_step,
               **timing}
        row.update({k: float(v) for k, v in m.items() if k not in row and k not in NOT_IN_ROWS})
        if eval_loss is not None:
            row["eval_loss"] = eval_loss
        self.rows.append(row)
        self._losses = []
        return row

    @property
    def eval_losses(self) -> list[float]:
        return [r["eval_loss"] for r in self.rows if "eval_loss" in r]

    @property
    def final_train_loss(self) -> float | None:
        """Mean training loss of the last ``FINAL_LOSS_STEPS`` steps (``None`` if diverged)."""
        return float(np.mean(self.recent)) if self.recent and self.running else None

    @property
    def final_eval_loss(self) -> float | None:
        """The last evaluation's loss (``None`` if diverged)."""
        evals = self.eval_losses
        return evals[-1] if evals and self.running else None


def summary(cfg: RunConfig, log: RunLog, corpus: data_lib.Corpus, **extra: Any) -> dict[str, Any]:
    """A finished (or diverged) run's summary: final and best losses, ``eval_tokens``, parameter
    counts, FLOPs, steps and tokens trained (up to the divergence), epochs, divergence; ``extra``
    (the driver's own fields, e.g. ``wall_time_s``) goes before ``diverged``."""
    tc = cfg.train
    counts = models.count_params(cfg.model)
    fpt = models.flops_per_token(cfg.model, tc.seq_len)["training"]
    steps = log.diverged_step if log.diverged_step is not None else tc.steps
    tokens = steps * log.tokens_per_step
    evals = log.eval_losses
    return {
        "final_train_loss": log.final_train_loss, "final_eval_loss": log.final_eval_loss,
        "min_eval_loss": min(evals) if evals else None,
        "eval_tokens": data_lib.eval_tokens(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                            n_batches=tc.eval_batches),
        "n_params": counts["total"], "n_params_non_embedding": counts["non_embedding"],
        "n_params_with_head": counts["with_head"], "n_params_active": counts["active"],
        "flops_per_token": fpt, "steps": steps, "tokens": tokens, "flops": fpt * tokens,
        "epochs": data_lib.epochs(corpus, tokens), **extra,
        "diverged": not log.running, "diverged_step": log.diverged_step,
    }


def lineage(source_cfg: RunConfig, source_step: int, *, source_run: str, growth_op: str,
            source_lineage: Mapping[str, Any] | None = None,
            growth_flops: float = 0.0) -> dict[str, Any]:
    """Where a grown run comes from: ``source_run`` (its directory), ``source_step`` (the checkpoint
    grown), ``growth_op`` (the growth step's text) and the compute that went into that checkpoint —
    ``source_tokens`` and ``source_flops``, the source's training tokens and FLOPs up to
    ``source_step`` (:func:`summary`'s ``tokens`` and ``flops`` for a finished source) plus, when
    the source was itself grown (``source_lineage``), its own sources' and growth's (a chain adds
    up) — and ``growth_flops``, the compute of the growth step itself (G_learn's training of its
    expansion: ``learn_steps`` steps of the big model's training FLOPs; 0 for the fixed maps)."""
    tc = source_cfg.train
    tokens = source_step * tc.batch_size * tc.seq_len
    flops = models.flops_per_token(source_cfg.model, tc.seq_len)["training"] * tokens
    if source_lineage is not None:
        tokens, flops = (tokens + source_lineage["source_tokens"],
                         flops + source_lineage["source_flops"]
                         + source_lineage.get("growth_flops", 0.0))
    return {"source_run": source_run, "source_step": source_step, "growth_op": growth_op,
            "source_tokens": tokens, "source_flops": flops, "growth_flops": float(growth_flops)}


def with_lineage(summary: Mapping[str, Any], lineage: Mapping[str, Any]) -> dict[str, Any]:
    """A grown run's ``summary`` with its :func:`lineage` and the total compute, source and growth
    included: ``total_tokens`` (``tokens + source_tokens``) and ``total_flops`` (``flops +
    source_flops + growth_flops``)."""
    return {**summary, **lineage, "total_tokens": summary["tokens"] + lineage["source_tokens"],
            "total_flops": summary["flops"] + lineage["source_flops"]
            + lineage.get("growth_flops", 0.0)}
