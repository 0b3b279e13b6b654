"""Devices: the mesh, the one map from logical axis names to mesh axes, batch placement and
multi-process start-up.

Parameters are annotated with logical axis names where they are created (`attn.layers.param`:
"embed", "mlp", "heads", ...); `RULES` maps each name to a mesh axis in the Megatron style
(Shoeybi et al. 2019): heads, MLP hidden units and the vocabulary split over "model",
everything else is replicated, and the batch splits over "data" (as MaxText's logical axis
rules, kept to a plain dict). `shardings` applies the rules to any pytree of abstract arrays
(model state, optimizer state, scalars): this is the only path from names to shardings, the
one the driver runs. A mesh axis that does not divide its dimension, or that a spec already
used, is dropped for that dimension (`fit_spec`), so any model places on any mesh.

- `make_mesh(config)`: `train.mesh.data` x `train.mesh.model` (-1: all remaining devices);
  `mesh_shape(config)` checks it (ConfigError) without building it.
- `shard_batch(batch, mesh, local=...)`: numpy batch -> global arrays split on "data".
- `init_distributed(enabled)`: jax.distributed.initialize for multi-process runs.
"""

import os

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from attn.registry import ConfigError, require

RULES: dict[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "embed": None,
    "mlp": "model",
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "state": None,
    "layers": None,
}


def mesh_shape(config) -> tuple[int, int]:
    """(data, model) of `train.mesh` on the devices JAX sees; ConfigError if it cannot be."""
    m, n = config.train.mesh, jax.device_count()
    require(m.model >= 1, "train.mesh.model", f"must be >= 1, got {m.model}")
    data = n // m.model if m.data == -1 else m.data
    require(data >= 1, "train.mesh.data", f"must be >= 1 or -1 (all devices), got {m.data}")
    used = data * m.model
    if used > n or (used < n and jax.process_count() > 1) or n % m.model:
        raise ConfigError(
            f"train.mesh: data={data} x model={m.model} = {used} devices, but {n} are "
            f"available ({jax.process_count()} processes); use data=-1 or a shape with "
            f"product {n}"
        )
    return data, m.model


def make_mesh(config) -> Mesh:
    """`data` x `model` mesh over the first data*model devices (all of them multi-process)."""
    data, model = mesh_shape(config)
    return jax.make_mesh(
        (data, model),
        ("data", "model"),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=jax.devices()[: data * model],
    )


def fit_spec(axes: tuple, shape: tuple, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide their dimension or are used twice."""
    used, out = set(), []
    for axis, size in zip(axes, shape, strict=True):
        if axis is None or axis in used or size % mesh.shape[axis]:
            out.append(None)
        else:
            used.add(axis)
            out.append(axis)
    return PartitionSpec(*out)


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


def shard_batch(batch: dict, mesh: Mesh, *, local: bool = True, spec=("data",)) -> dict:
    """Numpy batch -> global arrays split over "data" along the batch axis.

    local=True: `batch` holds this process's rows (train batches). local=False: every process
    holds the whole batch (eval sets) and keeps its own contiguous block of rows. `spec`
    places other layouts, e.g. (None, "data") for seeds stacked in front of the batch.
    """
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    if not local and jax.process_count() > 1:
        rows = next(iter(batch.values())).shape[0] // jax.process_count()
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
