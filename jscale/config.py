"""Run configuration: frozen, keyword-only dataclasses, one per section.

A :class:`RunConfig` composes five sections — ``model`` (a model family's own config class, e.g.
:class:`jscale.TransformerConfig`), ``data``, ``optim``, ``train`` and ``mesh`` — and, for a run
grown from a smaller one, ``growth`` (:class:`GrowthConfig`; absent from :meth:`RunConfig.to_dict`
when unset). Every knob is a declared
field with one default; ``__post_init__`` rejects impossible values with a message that names the field
and the constraint. Configs are values: change them with :meth:`RunConfig.override`, which takes dotted
keys (``{"optim.lr": 1e-3}``) and coerces strings (``"1e-3"``) to the field's declared type, so the CLI's
``--set optim.lr=1e-3`` and Python share one typed, validated path.

Sub-configs nest: a model config field holding a frozen dataclass (``moe: MoEConfig | None``) is walked
into, so ``model.moe.n_experts`` is a key like any other, and tuple fields take ``"1,2,3"``. The rules
(what a ``None`` sub-config accepts, how errors are named) are in :mod:`jscale.configpath`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from jscale import configpath, registry
from jscale.configpath import ConfigError, coerce  # noqa: F401  (coerce: re-exported)

#: Byte-level tokenizer: 256 byte values plus one end-of-document token (id 256).
BYTE_VOCAB_SIZE = 257
#: Default divergence threshold: this many times ln(V), the loss of a uniform prediction.
DIVERGENCE_FACTOR = 3.0
#: Runs planned for more epochs than this train with a warning (see ``DataConfig.max_epochs``).
EPOCHS_WARN = 4.0


def check(condition: bool, field: str, constraint: str, value: Any = None) -> None:
    """Raise :class:`ConfigError` naming ``field`` and ``constraint`` unless ``condition`` holds."""
    if not condition:
        got = "" if value is None else f" (got {value!r})"
        raise ConfigError(f"{field}: {constraint}{got}")


def _positive(cfg: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        check(value > 0, f"{prefix}.{name}", "must be > 0", value)


def _non_negative(cfg: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        check(value >= 0, f"{prefix}.{name}", "must be >= 0", value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the tokens come from.

    Attributes:
      path: ``None`` for the bundled State-of-the-Union corpus; otherwise a text file (documents
        separated by blank lines), a directory of ``.txt`` files (one document each), a ``.jsonl`` file
        with a ``text_field`` per line, or a ``.npy`` 1-D array of token ids (documents separated by the
        tokenizer's EOS id; split into train/validation by ``seq_len + 1`` blocks).
      text_field: JSONL field holding a document's text.
      tokenizer: ``"byte"`` (256 bytes + EOS, no files needed) or ``"bpe"`` (byte-level BPE trained on
        the training split with HF ``tokenizers``, ``model.vocab_size`` tokens, cached on disk).
      val_every: every ``val_every``-th document (index ``i % val_every == val_every - 1``) goes to the
        validation split; the rest train.
      cache_dir: where trained BPE tokenizers and tokenized corpora are cached (default
        ``$JSCALE_CACHE`` or ``~/.cache/jscale``).
      max_epochs: the most passes over the training split a run may make (``epochs`` = tokens seen /
        training tokens available, recorded in every summary and sweep row). A run planned beyond it
        is refused before it trains; beyond ``EPOCHS_WARN`` (4, where Muennighoff et al. 2023 find
        repeated tokens start to be worth less than fresh ones) it trains with a warning. Laws fitted
        on heavily repeated data are not compute-optimal laws: raise this only knowingly (``inf``
        disables the check).
    """

    path: str | None = None
    text_field: str = "text"
    tokenizer: Literal["byte", "bpe"] = "byte"
    val_every: int = 10
    cache_dir: str | None = None
    max_epochs: float = 16.0

    def __post_init__(self):
        check(self.val_every >= 2, "data.val_every", "must be >= 2 (one document in val_every "
              "goes to validation)", self.val_every)
        check(self.max_epochs > 0, "data.max_epochs", "must be > 0", self.max_epochs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with warmup then a decay schedule, global-norm clipping and a weight-decay mask.

    Attributes:
      lr: peak learning rate, reached at the end of warmup.
      weight_decay: decoupled weight decay (AdamW), applied to matrices only (never to norm scales or
        biases; to embeddings only when ``decay_embeddings``).
      warmup_steps: linear warmup from 0 to ``lr``.
      schedule: after warmup, ``"cosine"`` decays to ``lr * min_lr_ratio`` at the last step;
        ``"wsd"`` (warmup-stable-decay) holds ``lr`` and decays linearly to ``lr * min_lr_ratio`` over
        the last ``decay_fraction`` of the steps; ``"constant"`` holds ``lr``.
      min_lr_ratio: final learning rate as a fraction of ``lr`` (cosine and wsd).
      decay_fraction: fraction of all steps spent in the wsd decay phase.
      grad_clip: clip the global gradient norm to this value; 0 disables clipping.
      b1, b2, eps: Adam moments' decay rates and epsilon.
      decay_embeddings: apply weight decay to the embedding table too (a tied LM head is the
        embedding table, so it follows this flag).
      decay_head: apply weight decay to the untied LM head (``head.w_DV``, models with
        ``tie_embeddings=False``); off by default, like the embedding it mirrors.
    """

    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 10
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    decay_embeddings: bool = False
    decay_head: bool = False

    def __post_init__(self):
        _positive(self, "optim", "lr", "eps")
        _non_negative(self, "optim", "weight_decay", "warmup_steps", "grad_clip")
        check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]",
              self.min_lr_ratio)
        check(0.0 < self.decay_fraction <= 1.0, "optim.decay_fraction", "must be in (0, 1]",
              self.decay_fraction)
        for name in ("b1", "b2"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"optim.{name}", "must be in [0, 1)", value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop.

    Attributes:
      steps: optimizer steps.
      batch_size: sequences per step (global batch).
      seq_len: tokens per sequence (<= ``model.max_seq_len``).
      seed: seeds parameter initialization and data order.
      log_every: write a row to ``metrics.jsonl`` every this many steps (and at the last step).
      eval_every: evaluate on the validation split every this many steps (and at the end); 0 = only at
        the end.
      eval_batches: validation batches per evaluation: ``eval_batches × batch_size`` windows of
        ``seq_len`` tokens spread evenly over the whole validation split (the same windows for every
        run and every evaluation; all of them when the split has fewer). Summaries report the
        tokens covered as ``eval_tokens``.
      checkpoint_every: save a checkpoint every this many steps (and at the end); 0 = only at the end.
      keep_checkpoints: how many recent checkpoints to keep.
      flops_budget: the training-FLOP budget this run was sized for (set by
        :func:`jscale.sweep.isoflop`; recorded in results, changes nothing in training).
      divergence_loss: a training loss above this (or NaN/inf) means the run diverged: it stops (a
        sweep member is frozen at its last healthy state) and is reported ``diverged``. ``None``
        (default) is ``DIVERGENCE_FACTOR × ln(model.vocab_size)`` — three times the loss of predicting
        every token uniformly (16.6 nats for the 257-token byte vocabulary), a loss no training run
        reaches but a blown-up one does at once; ``inf`` counts only NaN/inf.
      trainable: which parameters the optimizer updates: ``"all"``, or a group the model family
        defines (ParScale's ``"parscale"``: only the prefixes and the aggregator, the backbone
        frozen). Frozen parameters get no gradient (it is not computed) and no update — weight
        decay included; their optimizer moments stay zero.
    """

    steps: int = 100
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    flops_budget: float | None = None
    divergence_loss: float | None = None
    trainable: str = "all"

    def __post_init__(self):
        _positive(self, "train", "steps", "batch_size", "seq_len", "log_every", "eval_batches",
                  "keep_checkpoints")
        if self.divergence_loss is not None:
            check(self.divergence_loss > 0, "train.divergence_loss", "must be > 0 (or None for "
                  "3·ln V)", self.divergence_loss)
        _non_negative(self, "train", "eval_every", "checkpoint_every", "seed")


MESH_AXES = ("data", "fsdp", "tensor", "expert", "runs")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device-mesh axis sizes (see :mod:`jscale.sharding`).

    All 1 (the default) is one device and the unsharded program. Otherwise the sizes must multiply to
    the device count; one axis may be -1 (all remaining devices). Whether the mesh suits the model and
    batch is checked at start-up by :func:`jscale.sharding.check_mesh`.

    Attributes:
      data: data parallelism (the batch is split, parameters replicated).
      fsdp: fully sharded data parallelism (the batch is split; parameters and optimizer state are
        sharded over their ``D`` dim and gathered one layer at a time).
      tensor: Megatron tensor parallelism (query/kv heads and the FFN width are split).
      expert: expert parallelism (models with experts).
      runs: sweeps only: a vmapped group's members are split over it.
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    runs: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            value = getattr(self, name)
            check(value >= 1 or value == -1, f"mesh.{name}", "must be >= 1 or -1 (all remaining "
                  "devices)", value)
        n_fill = sum(getattr(self, a) == -1 for a in MESH_AXES)
        check(n_fill <= 1, "mesh", "at most one axis may be -1", n_fill)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GrowthConfig:
    """This run starts from a smaller *source* run grown into its model (:mod:`jscale.growth`).

    The source is described relative to this run: the same config with ``growth`` removed,
    ``train.steps = source_steps``, for a depth step ``model.n_layers`` (and
    ``model.moe.first_dense_layers``) divided by the depth factor, then the ``source`` overrides —
    :meth:`RunConfig.source_config`. A sweep (:mod:`jscale.sweep`) trains that source as a member
    of its own and grows every run that names it from its final checkpoint; ``jscale train
    --init-from RUN --grow OP`` fills this section from RUN's config (its model must be the one
    described; the run itself is recorded in ``lineage.json``).

    Attributes:
      op: the growth step, ``OP[:G[:PLACEMENT]]`` (:mod:`jscale.growth.spec`: ``stack:4``,
        ``zero:2``, ``direct_width``, ``random:2``, ``learn:2``, …).
      source_steps: the source run's optimizer steps (the ``d`` of the paper: ``source_steps ×
        batch_size × seq_len`` tokens). Required (> 0).
      source: ``"key=value"`` overrides (``--set`` syntax) that make the source from this run
        after the depth division, e.g. ``("model.d_model=32", "model.d_ff=64")`` for width growth.
      grow_steps: ``random`` only: the new parameters are blended in with a factor ``m`` that rises
        linearly from 0 to 1 over this many steps of the grown run (0: at once).
      grow_optimizer_state: start from the source's Adam moments grown by the same operator
        (:func:`jscale.growth.grow_optimizer_state`) instead of a fresh optimizer state.
      learn_steps: ``learn`` only: the steps that train the LiGO expansion before it is
        materialised (``None``: 100). Their compute is counted in the run's total FLOPs.
    """

    op: str = "stack:2"
    source_steps: int = 0
    source: tuple[str, ...] = ()
    grow_steps: int = 0
    grow_optimizer_state: bool = False
    learn_steps: int | None = None

    #: ``learn_steps`` when it is ``None``.
    DEFAULT_LEARN_STEPS = 100

    def __post_init__(self):
        check(self.source_steps > 0, "growth.source_steps", "must be > 0: the steps the source run "
              "trains before it is grown", self.source_steps)
        _non_negative(self, "growth", "grow_steps")
        if self.learn_steps is not None:
            check(self.learn_steps > 0, "growth.learn_steps", "must be > 0 (or None for "
                  f"{self.DEFAULT_LEARN_STEPS})", self.learn_steps)
        for item in self.source:
            check("=" in item and item.partition("=")[0].strip(), "growth.source",
                  "items must be key=value overrides", item)
            check(not item.partition("=")[0].strip().startswith("growth"), "growth.source",
                  "a source is not grown itself here (its growth section is removed)", item)

    @property
    def op_name(self) -> str:
        """The operator's name (``op`` without ``:G``)."""
        return self.op.split(":", 1)[0].strip()

    @property
    def factor(self) -> int | None:
        """The depth factor ``G`` of ``op`` (``None``: width growth). The grammar itself is checked
        by :func:`jscale.growth.spec.check_run` when the run config is built."""
        parts = self.op.split(":")
        if self.op_name in ("direct_width", "zero_width"):  # width only: a :G is d_model's factor
            return None
        return int(parts[1]) if len(parts) > 1 and parts[1].strip().isdigit() else None


# ---------------------------------------------------------------------------------------------------
# Model families live in one registry (jscale.registry); config.py never imports the models.


def model_family(model_cfg: Any) -> str:
    """The registered family name of a model config instance."""
    return registry.family_of(model_cfg).name


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one training run needs. Build from a preset and override fields by dotted key."""

    model: Any
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    growth: GrowthConfig | None = None

    def __post_init__(self):
        family = registry.family_of(self.model)  # raises for an unregistered model config
        groups = family.param_groups(self.model)
        check(self.train.trainable in groups, "train.trainable",
              f"must be one of {sorted(groups)} for this {family.name} model", self.train.trainable)
        max_len = family.max_seq_len(self.model)
        if max_len is not None:
            check(self.train.seq_len <= max_len, "train.seq_len",
                  f"must be <= model.max_seq_len={max_len}", self.train.seq_len)
        if self.data.tokenizer == "byte":
            check(self.model.vocab_size == BYTE_VOCAB_SIZE, "model.vocab_size",
                  f"must equal the byte tokenizer's vocabulary ({BYTE_VOCAB_SIZE} = 256 bytes + EOS) "
                  "when data.tokenizer='byte'", self.model.vocab_size)
        if self.growth is not None:
            self._check_growth()

    def _check_growth(self) -> None:
        # the operator, the grammar and the shapes: jscale.growth.spec.check_run (registered)
        registry.growth_check()(self)

    def source_config(self) -> RunConfig:
        """The source run :class:`GrowthConfig` describes (``growth`` must be set): this config
        without ``growth``, with ``train.steps = growth.source_steps``, the depth divided by a depth
        step's factor, then ``growth.source``'s overrides."""
        g = self.growth
        check(g is not None, "growth", "this run is not grown (no growth section)")
        factor = g.factor
        updates: dict[str, Any] = {"train.steps": g.source_steps}
        if factor is not None:
            for key in ("n_layers", "first_dense_layers"):
                sub = self.model.moe if key == "first_dense_layers" else self.model
                if sub is None or not hasattr(sub, key):
                    continue
                n = getattr(sub, key)
                name = "model.moe." + key if key == "first_dense_layers" else "model." + key
                check(n % factor == 0, "growth.op", f"{g.op!r} divides {name}={n} by "
                      f"{factor} to make the source: it must be a multiple")
                updates[name] = n // factor
        updates.update(parse_overrides(list(g.source)))
        base = dataclasses.replace(self, growth=None)
        try:
            return base.override(updates)
        except ConfigError as e:
            raise ConfigError(f"growth.source: the source run it describes is not valid: {e}") \
                from None

    @property
    def divergence_threshold(self) -> float:
        """The training loss above which the run counts as diverged (``train.divergence_loss``, or
        ``DIVERGENCE_FACTOR · ln(model.vocab_size)``)."""
        if self.train.divergence_loss is not None:
            return float(self.train.divergence_loss)
        return DIVERGENCE_FACTOR * math.log(self.model.vocab_size)

    # -- dotted-key access ---------------------------------------------------------------------------
    def flat(self) -> dict[str, Any]:
        """Every leaf as ``{"section.field": value}``, walking into sub-configs
        (``"model.moe.n_experts"``); a ``None`` sub-config is one leaf (``"model.moe": None``)."""
        return configpath.flatten(self)

    def valid_keys(self) -> list[str]:
        """The leaf keys, in :meth:`flat` order. :meth:`override` also accepts a sub-config's own key
        (``model.moe``) and keys under a ``None`` sub-config (see :meth:`override`)."""
        return list(self.flat())

    def check_keys(self, keys: Iterable[str]) -> None:
        """Raise :class:`ConfigError` listing the valid keys for the first key :meth:`override` rejects."""
        for key in keys:
            if not configpath.accepts(self, key):
                raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(self.valid_keys())}")

    def override(self, updates: Mapping[str, Any]) -> RunConfig:
        """A copy with ``updates`` (``{"section.field": value}``, any depth) applied, typed and validated.

        String values are parsed to the field's declared type (so ``"1e-3"``, ``"true"``, ``"none"``,
        ``"1,2,3"`` work); each changed config is rebuilt once with all its changes, so every level's
        ``__post_init__`` checks them together. A sub-config key (``model.moe``) takes an instance, a
        mapping of its fields or ``None``; a key under a ``None`` sub-config (``model.moe.n_experts``)
        first builds that sub-config from its class defaults, then applies the key(s). An unknown key
        raises :class:`ConfigError` listing the valid keys.
        """
        self.check_keys(updates)
        return configpath.apply(self, updates)

    # -- serialization -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict (sub-configs as dicts, tuples as sequences); ``model`` carries its
        ``family``."""
        out = {s.name: dataclasses.asdict(getattr(self, s.name)) for s in dataclasses.fields(self)
               if getattr(self, s.name) is not None}  # growth: absent unless set (ids unchanged)
        out["model"] = {"family": model_family(self.model), **out["model"]}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict` (also after JSON: lists become tuples, dicts sub-configs, by the
        declared field types); an unknown section or field raises :class:`ConfigError` naming it."""
        sections = [f.name for f in dataclasses.fields(cls)]
        for name in d:
            if name not in sections:
                raise ConfigError(f"{name}: unknown config section (sections: {', '.join(sections)})")
        if "model" not in d:
            raise ConfigError("model: missing (a mapping with the model's family and fields)")
        model = dict(d["model"])
        family = registry.by_name(model.pop("family", None))
        hints = configpath.field_hints(cls)
        rest = {s: (None if d[s] is None else
                    configpath.from_plain(configpath.config_class(hints[s]), d[s], s))
                for s in sections if s != "model" and s in d}
        return cls(model=configpath.from_plain(family.config_cls, model, "model"), **rest)


# ---------------------------------------------------------------------------------------------------
def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """Parse CLI ``key=value`` strings into a dict (values stay strings; :meth:`override` types them)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (got {pair!r})")
        out[key.strip()] = value.strip()
    return out
