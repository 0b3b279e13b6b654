"""Devices: the mesh, the one map from logical axis names to mesh axes, batch placement and
multi-process start-up.

Parameters are annotated with logical axis names where they are created (`attn.layers.param`:
"embed", "mlp", "heads", ...); `RULES` maps each name to mesh axes in the Megatron style
(Shoeybi et al. 2019): heads, MLP hidden units and the vocabulary split over "model"; the
model dimension ("embed") splits over "fsdp", which shards every parameter and, since the
optimizer state has the parameters' shapes and names, the Adam moments too (fully sharded
data parallel: ZeRO-3, Rajbhandari et al. 2020; MaxText's "fsdp" axis); everything else is
replicated, and the batch splits over "data" x "fsdp" (as MaxText's logical axis rules, kept
to a plain dict). XLA's SPMD partitioner gathers each parameter where a step uses it.
`shardings` applies the rules to any pytree of abstract arrays (model state, optimizer state,
scalars): this is the only path from names to shardings, the one the driver runs. A mesh axis
that does not divide its dimension, that a spec already used, or that the mesh does not have
(fsdp = 1 builds no "fsdp" axis) is dropped for that dimension (`fit_spec`), so any model
places on any mesh.

- `make_mesh(config)`: `train.mesh.data` x `train.mesh.fsdp` x `train.mesh.model` (data -1:
  all remaining devices); `mesh_axes(config)` checks it (ConfigError) without building it,
  `mesh_shape(config)` is (batch shards = data x fsdp, model).
- `batch_spec(mesh)`: the batch axis' entry of a PartitionSpec ("data", or ("data", "fsdp")).
- `shard_batch(batch, mesh, local=...)`: numpy batch -> global arrays split over the batch
  axes.
- `init_distributed(enabled)`: jax.distributed.initialize for multi-process runs.
"""

import math
import os

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from attn.registry import ConfigError, require

RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "model",
    "embed": "fsdp",
    "mlp": "model",
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "state": None,
    "layers": None,
}


def mesh_axes(config) -> dict[str, int]:
    """{"data", "fsdp", "model"} sizes of `train.mesh` on the devices JAX sees; ConfigError if
    it cannot be."""
    m, n = config.train.mesh, jax.device_count()
    fsdp = m.get("fsdp", 1)
    require(m.model >= 1, "train.mesh.model", f"must be >= 1, got {m.model}")
    require(fsdp >= 1, "train.mesh.fsdp", f"must be >= 1, got {fsdp}")
    data = n // (m.model * fsdp) if m.data == -1 else m.data
    require(data >= 1, "train.mesh.data", f"must be >= 1 or -1 (all devices), got {m.data}")
    used = data * fsdp * m.model
    if used > n or (used < n and jax.process_count() > 1) or n % (m.model * fsdp):
        shape = f"data={data} x " + (f"fsdp={fsdp} x " if fsdp > 1 else "") + f"model={m.model}"
        raise ConfigError(
            f"train.mesh: {shape} = {used} devices, but {n} are available "
            f"({jax.process_count()} processes); use data=-1 or a shape with product {n}"
        )
    return {"data": data, "fsdp": fsdp, "model": m.model}


def mesh_shape(config) -> tuple[int, int]:
    """(batch shards = data x fsdp, model) of `train.mesh`; ConfigError if it cannot be."""
    axes = mesh_axes(config)
    return axes["data"] * axes["fsdp"], axes["model"]


def make_mesh(config) -> Mesh:
    """`data` x [`fsdp` x] `model` mesh over the first devices (all of them multi-process);
    the "fsdp" axis exists only when train.mesh.fsdp > 1, "model" is the innermost (fastest
    interconnect) axis."""
    axes = mesh_axes(config)
    names = tuple(a for a in ("data", "fsdp", "model") if a != "fsdp" or axes[a] > 1)
    shape = tuple(axes[a] for a in names)
    return jax.make_mesh(
        shape,
        names,
        axis_types=(AxisType.Auto,) * len(names),
        devices=jax.devices()[: math.prod(shape)],
    )


def _fit_entry(entry, size: int, mesh: Mesh, used: set):
    """One PartitionSpec entry: the mesh axes of `entry` (a name or a tuple of names) that the
    mesh has, that are not used yet and whose product divides `size`; None if none are."""
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    kept, product = [], 1
    for axis in names:
        if axis in mesh.shape and axis not in used and size % (product * mesh.shape[axis]) == 0:
            kept.append(axis)
            product *= mesh.shape[axis]
    used.update(kept)
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else tuple(kept)


def fit_spec(axes: tuple, shape: tuple, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide their dimension, are used twice or are not in the
    mesh."""
    used: set = set()
    return PartitionSpec(
        *(_fit_entry(a, size, mesh, used) for a, size in zip(axes, shape, strict=True))
    )


def shardings(abstract_tree, mesh: Mesh):
    """NamedShardings for every leaf of a pytree of (abstract) arrays; nnx.Variables carry
    their logical axis names, every other leaf (optimizer counts, RNG keys) is replicated."""
    with flax_spmd.logical_axis_rules(tuple(RULES.items())):
        specs = nnx.get_partition_spec(abstract_tree)
    # fit_spec before NamedSharding: a mesh axis that does not divide a dimension (6 heads on
    # model=4) replicates it, and so does a second use of one mesh axis (FIRE's MLP output
    # kernel is ("mlp", "heads"), both "model"), which NamedSharding rejects.
    return jax.tree.map(
        lambda a, s: NamedSharding(
            mesh, fit_spec(tuple(s) + (None,) * (len(a.shape) - len(s)), a.shape, mesh)
        ),
        abstract_tree,
        specs,
    )


def batch_spec(mesh: Mesh):
    """The PartitionSpec entry of a batch axis on `mesh`: RULES["batch"]'s axes it has."""
    axes = tuple(a for a in RULES["batch"] if a in mesh.shape)
    return axes[0] if len(axes) == 1 else (axes or None)


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch axis is split on `mesh`."""
    return math.prod(mesh.shape[a] for a in RULES["batch"] if a in mesh.shape)


def shard_batch(batch: dict, mesh: Mesh, *, local: bool = True, spec=None) -> dict:
    """Numpy batch -> global arrays split over the batch axes (`batch_spec`) along axis 0.

    local=True: `batch` holds this process's rows (train batches). local=False: every process
    holds the whole batch (eval sets) and keeps its own contiguous block of rows; rows of
    zeros (nothing scored, every token masked) are added up to a multiple of the batch shards
    and processes. `spec` places other layouts, e.g. (None, batch_spec(mesh)) for seeds
    stacked in front of the batch.
    """
    sharding = NamedSharding(mesh, PartitionSpec(*(spec or (batch_spec(mesh),))))
    if not local:
        rows = next(iter(batch.values())).shape[0]
        extra = -rows % math.lcm(batch_shards(mesh), jax.process_count())
        if extra:
            batch = {
                k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()
            }
        if jax.process_count() > 1:
            rows = (rows + extra) // jax.process_count()
            lo = jax.process_index() * rows
            batch = {k: v[lo : lo + rows] for k, v in batch.items()}
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def init_distributed(enabled: bool | None = None) -> None:
    """jax.distributed.initialize for multi-process runs.

    experiments/multi.py sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
    enabled=True with none of them uses JAX's cluster auto-detection (SLURM, TPU pods, ...).
    """
    env = os.environ
    if enabled is None:
        enabled = "JAX_COORDINATOR_ADDRESS" in env
    if not enabled:
        return
    if "JAX_NUM_PROCESSES" in env:
        jax.distributed.initialize(
            env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
