"""The mesh half of sharding: building the device mesh, checking it against a run, global batches,
and multi-host start-up (with its command-line flags).

The model-facing half — rules, specs derived from leaf names, ``constrain``, ``per_shard``, the
:class:`~jscale.sharding.Layout` — is :mod:`jscale.sharding`; this module builds on it and on the
configs, and knows nothing of model families: :func:`check_mesh` takes the parameters' abstract
shapes (``jax.eval_shape`` of the family's init) instead of building a model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from jscale.config import ConfigError, MeshConfig, RunConfig
from jscale.sharding import DIM_NAMES, MESH_ORDER, PARAM_RULES, STRICT_DIMS, Layout, leaf_dims

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


def check_mesh(cfg: RunConfig, param_shapes: Any, n_devices: int | None = None, *,
               sweep: bool = False, dim_fields: Mapping[str, str] | None = None) -> dict[str, int]:
    """Check that ``cfg.mesh`` can work for ``cfg`` on ``n_devices`` (default: all devices); return
    the resolved axis sizes. ``param_shapes`` is the model's parameter tree as abstract shapes
    (``jax.eval_shape`` of its init: no memory is used); ``dim_fields`` names the config field behind
    each strict dim in errors (the family's ``dim_fields``, e.g. ``{"F": "model.d_ff"}``). Raises
    :class:`ConfigError` naming the field and the constraint:

    * the axis sizes must multiply to the device count (one may be -1);
    * ``train.batch_size`` must divide by ``mesh.data × mesh.fsdp`` (the batch is split over both);
    * every parameter dim a rule shards must divide by its axes: ``d_model`` by ``fsdp``; query
      heads, kv heads and the FFN width by ``tensor``; experts by ``expert``;
    * ``mesh.expert > 1`` needs a model with experts; ``mesh.runs > 1`` only applies to sweeps.
    """
    n_devices = jax.device_count() if n_devices is None else n_devices
    sizes = mesh_sizes(cfg.mesh, n_devices)
    split = sizes["data"] * sizes["fsdp"]
    if cfg.train.batch_size % split:
        raise ConfigError(f"train.batch_size: must be divisible by mesh.data × mesh.fsdp = "
                          f"{sizes['data']} × {sizes['fsdp']} = {split} (got {cfg.train.batch_size})")
    if sizes["runs"] > 1 and not sweep:
        raise ConfigError(f"mesh.runs: only `jscale sweep` shards runs; a single run needs "
                          f"mesh.runs=1 (got {sizes['runs']})")
    names = dict(dim_fields or {})
    seen_dims: set[str] = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes)[0]:
        dims = leaf_dims(path, leaf.ndim)
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
                        f"mesh.{axis}: must divide {names.get(d, DIM_NAMES[d])} = {size} (dim {d} of "
                        f"parameter "
                        f"{jax.tree_util.keystr(path)}); got mesh.{axis}={sizes[axis]}")
    if sizes["expert"] > 1 and "E" not in seen_dims:
        raise ConfigError(f"mesh.expert: the model has no experts (no parameter with an E dim); "
                          f"must be 1 (got {sizes['expert']})")
    return sizes


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


def make_layout(cfg: RunConfig, param_shapes: Any, *, sweep: bool = False,
                dim_fields: Mapping[str, str] | None = None) -> Layout | None:
    """The device layout ``cfg.mesh`` asks for, checked against ``cfg`` and its parameters' abstract
    shapes (:func:`check_mesh`; ``sweep`` allows the ``runs`` axis); ``None`` for the default mesh
    (every axis 1): the single-device path, no mesh and no constraints."""
    if is_single_device(cfg.mesh):
        if jax.process_count() > 1 and not sweep:
            raise ConfigError(f"mesh: {jax.process_count()} processes are running but the mesh is "
                              "one device; set the mesh axes (e.g. --set mesh.data=-1)")
        return None
    check_mesh(cfg, param_shapes, sweep=sweep, dim_fields=dim_fields)
    return Layout(make_mesh(cfg.mesh))
