"""Logical-dim rules, shardings derived from leaf names, and the constraints model code applies.

This is the model-facing half of sharding (the mesh half — building meshes, checking them, global
batches, multi-host start-up — is :mod:`jscale.mesh`). One mesh with five named axes serves every
layout (outermost first, so the fast inner links carry the most traffic):

========  =================================================================================
runs      sweeps: the leading run axis R of a vmapped group (``jscale sweep`` only)
data      data parallelism: the batch is split, parameters are replicated
fsdp      fully sharded data parallelism: the batch is split *and* parameters + optimizer state are
          sharded over their ``D`` dim; each layer's weights are gathered inside the layer scan
expert    expert parallelism (``E`` dims; models with experts)
tensor    Megatron tensor parallelism: query/kv heads and the FFN / inner width are split
========  =================================================================================

Model code names logical dims only (the glossary of :mod:`jscale.nn`); two small tables map them to mesh
axes: :data:`PARAM_RULES` for parameters (and, by the same names, their optimizer state) and
:data:`ACTIVATION_RULES` for activations. A parameter's spec is derived from the shape suffix of its
leaf name (``w_q_LDHK`` → ``L D H K`` → ``P(None, "fsdp", "tensor", None)``), so no layer writes a spec.
A dim whose size the axes do not divide stays replicated (this is how the 257-token byte vocabulary
is handled); the divisions the math needs are checked up front by :func:`jscale.mesh.check_mesh`.

Axis types are ``Auto`` (see :func:`jscale.mesh.make_mesh`): shardings are fixed at the jit boundary
(state, batch) and at a few named points inside the models (:func:`constrain`,
:func:`constrain_params`), and XLA's partitioner inserts the collectives in between. The same model
functions therefore run unsharded, sharded and vmapped; with no active layout every constraint is the
identity, so the single-device path is exactly the unsharded program.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jscale.config import MESH_AXES

#: Mesh axis order, outermost first.
MESH_ORDER = ("runs", "data", "fsdp", "expert", "tensor")
assert sorted(MESH_ORDER) == sorted(MESH_AXES)

Rules = Mapping[str, tuple[str, ...]]

#: Parameters: logical dim → mesh axes. Dims not listed (L, K, N, W, ...) are replicated.
PARAM_RULES: Rules = {
    "R": ("runs",),
    "D": ("fsdp",),
    "H": ("tensor",), "G": ("tensor",), "F": ("tensor",), "V": ("tensor",),
    "E": ("expert",),
}

#: Activations: logical dim → mesh axes. The batch is split over data and fsdp together.
ACTIVATION_RULES: Rules = {
    "R": ("runs",),
    "B": ("data", "fsdp"),
    "H": ("tensor",), "G": ("tensor",), "F": ("tensor",), "V": ("tensor",),
    "E": ("expert",),
}

#: Dims whose size must divide by their axes (checked by :func:`check_mesh`); any other dim falls
#: back to replicated when it does not divide (e.g. the byte vocabulary V = 257).
STRICT_DIMS = frozenset("DHGFE")

#: What each strict dim is, for error messages (the family's own field is named by the parameter).
DIM_NAMES = {"D": "the model width", "H": "the query heads", "G": "the key/value heads",
             "F": "the FFN / inner width", "E": "the number of experts"}

_DIMS_RE = re.compile(r"_([A-Z]+)$")


def dims_of(name: str) -> str | None:
    """The logical dims of a leaf from its name's shape suffix: ``"w_q_LDHK"`` → ``"LDHK"``;
    ``None`` when the name has no suffix (``"count"``, ``"learning_rate"``)."""
    m = _DIMS_RE.search(name)
    return m.group(1) if m else None


def _leaf_name(path: tuple) -> str:
    last = path[-1] if path else None
    for attr in ("key", "name", "idx"):
        if hasattr(last, attr):
            return str(getattr(last, attr))
    return str(last)


def leaf_dims(path: tuple, ndim: int, *, runs_axis: bool = False) -> str:
    """Dims of the leaf at ``path`` with ``ndim`` dims: its name's suffix (with a leading ``R`` in a
    vmapped sweep; without the ``L`` inside the layer scan). A leaf without a suffix gets the
    placeholder dim ``_`` (never sharded) on every axis; :func:`check_mesh` requires a suffix on
    every parameter."""
    lead = "R" if runs_axis and ndim > 0 else ""
    dims = dims_of(_leaf_name(path))
    if dims is None:  # no shape suffix (PRNG keys, step counts): replicated
        return lead + "_" * (ndim - len(lead))
    dims = lead + dims
    if len(dims) == ndim:
        return dims
    if ndim == 0:
        return ""
    if len(dims) == ndim + 1 and "L" in dims:  # one layer's slice of a stacked leaf
        return dims.replace("L", "", 1)
    raise ValueError(f"leaf {jax.tree_util.keystr(path)} has {ndim} dims but its name gives "
                     f"{dims or 'no shape suffix'!r}: name every array leaf with its shape letters")


def spec_for(dims: str, shape: tuple[int, ...], rules: Rules, axis_sizes: Mapping[str, int]) -> P:
    """The ``PartitionSpec`` that ``rules`` give an array with logical ``dims`` and ``shape``.

    Axes of size 1 are left out; an axis is used at most once (first dim wins); a dim whose size the
    axes' product does not divide is replicated.
    """
    used: set[str] = set()
    entries: list[Any] = []
    for d, size in zip(dims, shape, strict=True):
        axes = tuple(a for a in rules.get(d, ()) if axis_sizes.get(a, 1) > 1 and a not in used)
        if not axes or size % math.prod(axis_sizes[a] for a in axes):
            entries.append(None)
            continue
        used.update(axes)
        entries.append(axes[0] if len(axes) == 1 else axes)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def axis_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))


def tree_specs(tree: Any, mesh: Mesh, rules: Rules = PARAM_RULES, *,
               runs_axis: bool = False) -> Any:
    """``PartitionSpec`` of every leaf of ``tree`` (arrays or shape structs), derived from leaf names.

    Works for parameters and for optimizer state alike: optax's moments keep the parameters' leaf
    names, so they are sharded like their parameters; scalars (step counts, hyperparameters) are
    replicated. ``runs_axis``: leaves carry a leading run axis ``R`` (a vmapped sweep group).
    """
    sizes = axis_sizes(mesh)

    def leaf(path, x):
        return spec_for(leaf_dims(path, np.ndim(x), runs_axis=runs_axis), np.shape(x), rules, sizes)
    return jax.tree_util.tree_map_with_path(leaf, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = PARAM_RULES, *,
                   runs_axis: bool = False) -> Any:
    """:func:`tree_specs` as ``NamedSharding``\\ s on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s),
                        tree_specs(tree, mesh, rules, runs_axis=runs_axis),
                        is_leaf=lambda x: isinstance(x, P))


# ---------------------------------------------------------------------------------------------------
# the active layout: what `constrain` sees while a sharded program is traced


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the rules that place parameters and activations on it."""

    mesh: Mesh
    param_rules: Rules = dataclasses.field(default_factory=lambda: PARAM_RULES)
    activation_rules: Rules = dataclasses.field(default_factory=lambda: ACTIVATION_RULES)

    @property
    def axis_sizes(self) -> dict[str, int]:
        """Mesh axis name → size."""
        return axis_sizes(self.mesh)

    def sharding(self, spec: P) -> NamedSharding:
        """``NamedSharding(self.mesh, spec)``."""
        return NamedSharding(self.mesh, spec)

    def batch_sharding(self, ndim: int = 2, *, runs_axis: bool = False) -> NamedSharding:
        """Sharding of a ``[B, T, ...]`` batch array (``[R, B, T, ...]`` with ``runs_axis``)."""
        sizes = self.axis_sizes

        def entry(dim: str):
            axes = tuple(a for a in self.activation_rules.get(dim, ()) if sizes.get(a, 1) > 1)
            return None if not axes else axes[0] if len(axes) == 1 else axes
        lead = (entry("R"),) if runs_axis else ()
        return self.sharding(P(*lead, entry("B"), *([None] * (ndim - 1))))

    def replicated(self) -> NamedSharding:
        """Fully replicated (metrics, scalars)."""
        return self.sharding(P())


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("jscale_layout",
                                                                       default=None)


@contextlib.contextmanager
def activate(layout: Layout | None) -> Iterator[None]:
    """Make ``layout`` the one :func:`constrain` uses while tracing inside this block."""
    token = _ACTIVE.set(layout)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_layout() -> Layout | None:
    """The layout active while tracing (:func:`activate`), or ``None`` (the single-device path):
    for model code that places a computation itself (an all-to-all under ``jax.shard_map``)."""
    return _ACTIVE.get()


def traced_under(layout: Layout | None, fn):
    """``fn`` that runs (and so is traced) with ``layout`` active; wrap before ``jax.jit``."""
    if layout is None:
        return fn

    def wrapped(*args, **kwargs):
        with activate(layout):
            return fn(*args, **kwargs)
    return wrapped


def constrain(x: jax.Array, dims: str) -> jax.Array:
    """Constrain activation ``x`` (logical ``dims``, e.g. ``"BTD"``) to its place under the active
    layout's activation rules; the identity when no layout is active."""
    layout = _ACTIVE.get()
    if layout is None:
        return x
    spec = spec_for(dims, x.shape, layout.activation_rules, layout.axis_sizes)
    return jax.lax.with_sharding_constraint(x, layout.sharding(spec))


def constrain_params(params: Any, dims: str | None = None) -> Any:
    """Parameters as the computation uses them: FSDP's ``fsdp`` sharding dropped, tensor/expert
    sharding kept. Applied to one layer's slice of the ``L``-stacked tree inside the layer scan, this
    is FSDP's per-layer all-gather (and, transposed, the gradients' reduce-scatter). ``params`` is a
    tree whose leaf names carry their dims, or one array with its ``dims``. The identity when no
    layout is active."""
    layout = _ACTIVE.get()
    if layout is None or layout.axis_sizes.get("fsdp", 1) == 1:
        return params
    rules = {d: tuple(a for a in axes if a != "fsdp") for d, axes in layout.param_rules.items()}
    if dims is not None:
        spec = spec_for(dims, params.shape, rules, layout.axis_sizes)
        return jax.lax.with_sharding_constraint(params, layout.sharding(spec))
    specs = tree_specs(params, layout.mesh, rules)
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, layout.sharding(s)),
                        params, specs)


def per_shard(fn, in_dims: tuple[str | None, ...], out_dims: str):
    """``fn`` run on each device's block (``jax.shard_map``) under the active layout; ``fn`` itself
    when none is active.

    For ops XLA cannot partition — Pallas kernels are opaque custom calls, which the partitioner
    would gather and run whole on every device — but that are independent across the sharded dims
    (attention across batch and heads, the selective scan across batch and channels). Each argument
    is split by the activation rules for its ``in_dims`` (``None``: a non-array or replicated
    argument); the result, shaped like the first argument, is assembled from its blocks by
    ``out_dims``.
    """
    def wrapped(*args):
        layout = _ACTIVE.get()
        if layout is None:
            return fn(*args)
        sizes, rules = layout.axis_sizes, layout.activation_rules
        in_specs = tuple(P() if d is None or a is None else spec_for(d, a.shape, rules, sizes)
                         for a, d in zip(args, in_dims, strict=True))
        out_spec = spec_for(out_dims, args[0].shape, rules, sizes)
        return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_spec,
                             check_vma=False)(*args)
    return wrapped
