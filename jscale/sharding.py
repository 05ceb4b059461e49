"""Device meshes, logical-dim rules, shardings derived from leaf names, and multi-host start-up.

One mesh with five named axes serves every layout (outermost first, so the fast inner links carry the
most traffic):

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
is handled); the divisions the math needs are checked up front by :func:`check_mesh`.

Axis types are ``Auto``, chosen explicitly in :func:`make_mesh`: shardings are fixed at the jit
boundary (state, batch) and at a few named points inside the models (:func:`constrain`,
:func:`constrain_params`), and XLA's partitioner inserts the collectives in between. The same model
functions therefore run unsharded, sharded and vmapped; with no active layout every constraint is the
identity, so the single-device path is exactly the unsharded program.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jscale.config import MESH_AXES, ConfigError, MeshConfig, RunConfig

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

#: What each strict dim is, for error messages.
DIM_FIELDS = {"D": "model.d_model", "H": "model.n_heads", "G": "model.n_kv_heads",
              "F": "the FFN / inner width (model.d_ff, or expand × d_model for Mamba)",
              "E": "the number of experts"}

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


def _leaf_dims(path: tuple, ndim: int, *, runs_axis: bool = False) -> str:
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


def _axis_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))


def tree_specs(tree: Any, mesh: Mesh, rules: Rules = PARAM_RULES, *,
               runs_axis: bool = False) -> Any:
    """``PartitionSpec`` of every leaf of ``tree`` (arrays or shape structs), derived from leaf names.

    Works for parameters and for optimizer state alike: optax's moments keep the parameters' leaf
    names, so they are sharded like their parameters; scalars (step counts, hyperparameters) are
    replicated. ``runs_axis``: leaves carry a leading run axis ``R`` (a vmapped sweep group).
    """
    sizes = _axis_sizes(mesh)

    def leaf(path, x):
        return spec_for(_leaf_dims(path, np.ndim(x), runs_axis=runs_axis), np.shape(x), rules, sizes)
    return jax.tree_util.tree_map_with_path(leaf, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = PARAM_RULES, *,
                   runs_axis: bool = False) -> Any:
    """:func:`tree_specs` as ``NamedSharding``\\ s on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s),
                        tree_specs(tree, mesh, rules, runs_axis=runs_axis),
                        is_leaf=lambda x: isinstance(x, P))


# ---------------------------------------------------------------------------------------------------
# the mesh


def mesh_sizes(mesh_cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with the ``-1`` axis (if any) filled with the remaining devices; validated so that
    their product is ``n_devices``."""
    sizes = {a: getattr(mesh_cfg, a) for a in MESH_ORDER}
    fill = [a for a, s in sizes.items() if s == -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    product = " × ".join(f"{a}={s}" for a, s in sizes.items() if s not in (1, -1))
    if fill:
        if n_devices % fixed:
            raise ConfigError(f"mesh.{fill[0]}: -1 fills the remaining devices, but the other axes "
                              f"({product}) multiply to {fixed}, which does not divide the "
                              f"{n_devices} devices")
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"mesh: the axis sizes ({product or 'all 1'}) multiply to {fixed}, but there "
                          f"are {n_devices} devices; their product must equal the device count "
                          "(set one axis to -1 to use all remaining devices)")
    return sizes


def is_single_device(mesh_cfg: MeshConfig) -> bool:
    """True for the default mesh (every axis 1): no mesh, no constraints, one device."""
    return all(getattr(mesh_cfg, a) == 1 for a in MESH_ORDER)


def make_mesh(cfg: MeshConfig | RunConfig, devices: list | None = None) -> Mesh:
    """The ``jax.sharding.Mesh`` for ``cfg`` (a ``MeshConfig``, or a ``RunConfig``'s ``mesh``) over
    ``devices`` (default: all devices, across every process), axes in :data:`MESH_ORDER`, all of
    type ``Auto`` (see the module docstring)."""
    mesh_cfg = cfg.mesh if isinstance(cfg, RunConfig) else cfg
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(mesh_cfg, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in MESH_ORDER), MESH_ORDER,
                         axis_types=(AxisType.Auto,) * len(MESH_ORDER), devices=devices)


def check_mesh(cfg: RunConfig, n_devices: int | None = None, *, sweep: bool = False) -> dict[str, int]:
    """Check that ``cfg.mesh`` can work for ``cfg`` on ``n_devices`` (default: all devices); return
    the resolved axis sizes. Raises :class:`ConfigError` naming the field and the constraint:

    * the axis sizes must multiply to the device count (one may be -1);
    * ``train.batch_size`` must divide by ``mesh.data × mesh.fsdp`` (the batch is split over both);
    * every parameter dim a rule shards must divide by its axes: ``d_model`` by ``fsdp``; query
      heads, kv heads and the FFN width by ``tensor``; experts by ``expert``;
    * ``mesh.expert > 1`` needs a model with experts; ``mesh.runs > 1`` only applies to sweeps.
    """
    from jscale import models  # models import this module (constrain); import lazily

    n_devices = jax.device_count() if n_devices is None else n_devices
    sizes = mesh_sizes(cfg.mesh, n_devices)
    split = sizes["data"] * sizes["fsdp"]
    if cfg.train.batch_size % split:
        raise ConfigError(f"train.batch_size: must be divisible by mesh.data × mesh.fsdp = "
                          f"{sizes['data']} × {sizes['fsdp']} = {split} (got {cfg.train.batch_size})")
    if sizes["runs"] > 1 and not sweep:
        raise ConfigError(f"mesh.runs: only `jscale sweep` shards runs; a single run needs "
                          f"mesh.runs=1 (got {sizes['runs']})")
    shapes = jax.eval_shape(lambda: models.init(jax.random.PRNGKey(0), cfg.model))
    seen_dims: set[str] = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        dims = _leaf_dims(path, leaf.ndim)
        if "_" in dims:
            raise ConfigError(f"model: parameter {jax.tree_util.keystr(path)} has no shape suffix in "
                              "its name (e.g. w_up_LDF); sharding rules are derived from it")
        seen_dims.update(dims)
        for d, size in zip(dims, leaf.shape, strict=True):
            if d not in STRICT_DIMS:
                continue
            for axis in PARAM_RULES.get(d, ()):
                if size % sizes[axis]:
                    raise ConfigError(
                        f"mesh.{axis}: must divide {DIM_FIELDS[d]} = {size} (dim {d} of parameter "
                        f"{jax.tree_util.keystr(path)}); got mesh.{axis}={sizes[axis]}")
    if sizes["expert"] > 1 and "E" not in seen_dims:
        raise ConfigError(f"mesh.expert: the model has no experts (no parameter with an E dim); "
                          f"must be 1 (got {sizes['expert']})")
    return sizes


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
        return _axis_sizes(self.mesh)

    def sharding(self, spec: P) -> NamedSharding:
        """``NamedSharding(self.mesh, spec)``."""
        return NamedSharding(self.mesh, spec)

    def batch_sharding(self, ndim: int = 2, *, runs_axis: bool = False) -> NamedSharding:
        """Sharding of a ``[B, T, ...]`` batch array (``[R, B, T, ...]`` with ``runs_axis``)."""
        lead = ("runs",) if runs_axis and self.axis_sizes["runs"] > 1 else ()
        batch = tuple(a for a in ACTIVATION_RULES["B"] if self.axis_sizes[a] > 1)
        entry = None if not batch else batch[0] if len(batch) == 1 else batch
        return self.sharding(P(*lead, entry, *([None] * (ndim - 1))))

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


# ---------------------------------------------------------------------------------------------------
# batches as global arrays


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """The contiguous block ``[lo, hi)`` of the leading (batch) dim held by this process's devices.

    Each process loads only these rows; :func:`global_batch` assembles the global array.
    """
    index_map = sharding.addressable_devices_indices_map(global_shape)
    starts, stops = [], []
    for idx in index_map.values():
        sl = idx[0] if idx else slice(None)
        start, stop, _ = sl.indices(global_shape[0])
        starts.append(start)
        stops.append(stop)
    lo, hi = min(starts), max(stops)
    covered = np.zeros(hi - lo, bool)
    for s, e in zip(starts, stops, strict=True):
        covered[s - lo:e - lo] = True
    if not covered.all():
        raise ConfigError("mesh: this process's devices hold a non-contiguous part of the batch; "
                          "order the mesh so that each process's devices are adjacent on data/fsdp")
    return lo, hi


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding,
                 global_rows: int) -> dict[str, jax.Array]:
    """Global ``jax.Array``\\ s from this process's rows of each batch array (all processes call it)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows, *v.shape[1:]))
            for k, v in local.items()}


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (each device takes its slice)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# ---------------------------------------------------------------------------------------------------
# multi-host


#: Environment variables by which JAX's own cluster auto-detection recognizes a multi-process job.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _in_cluster() -> bool:
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False  # a one-task SLURM job is a single process
    if os.environ.get("OMPI_COMM_WORLD_SIZE") == "1":
        return False
    if "," not in os.environ.get("TPU_WORKER_HOSTNAMES", ","):
        return False  # a single-host TPU VM
    return any(os.environ.get(v) for v in _CLUSTER_ENV)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a multi-process JAX job; returns whether one was joined.

    With ``coordinator`` (``HOST:PORT``), ``num_processes`` and ``process_id`` given, joins that job
    (``jax.distributed.initialize``). With none of them, JAX's own cluster auto-detection runs when
    the environment is a multi-process job (TPU pod slice, SLURM with several tasks, Open MPI, or
    ``JAX_COORDINATOR_ADDRESS``); otherwise this is a single-process run and nothing happens. CPU
    collectives use gloo, so the same code runs across processes on CPU-only hosts. Must be called
    before any other JAX computation.
    """
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ConfigError("--coordinator, --num-processes and --process-id go together "
                          "(give all three, or none for auto-detection)")
    if not any(given) and not _in_cluster():
        return False
    if num_processes is not None:
        if num_processes < 1:
            raise ConfigError(f"--num-processes: must be >= 1 (got {num_processes})")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id: must be in [0, --num-processes={num_processes}) "
                              f"(got {process_id})")
        if ":" not in coordinator:
            raise ConfigError(f"--coordinator: must be HOST:PORT (got {coordinator!r})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True


def is_primary() -> bool:
    """True on the process that writes metrics, results and summaries (process 0)."""
    return jax.process_index() == 0


def add_distributed_arguments(parser) -> None:
    """``--coordinator HOST:PORT --num-processes N --process-id I`` on an argparse parser."""
    group = parser.add_argument_group(
        "multi-process", "run one process per host, each with the same command and its own "
        "--process-id; with none of these flags, JAX's cluster auto-detection is used on TPU pods, "
        "SLURM and Open MPI jobs")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0's coordination service")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")


def initialize_from_args(args) -> bool:
    """:func:`initialize_distributed` from :func:`add_distributed_arguments`' options."""
    return initialize_distributed(args.coordinator, args.num_processes, args.process_id)
