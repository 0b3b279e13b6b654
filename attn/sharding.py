"""Logical axis names of parameters -> device-mesh axes ("data", "model").

Parameters are annotated with logical names (attn.layers.param); this module maps them to a
`jax.sharding.Mesh` with axes ("data", "model") in the Megatron style (Shoeybi et al. 2019,
"Megatron-LM"): heads, MLP hidden units and the vocabulary split over "model"; everything else
is replicated, and the batch splits over "data". The same scheme as MaxText's logical axis
rules, kept to a plain dict so that a config or a test can override one entry.

A dimension whose size the mesh axis does not divide is replicated instead (a vocabulary of 12
on a model axis of 8, MQA's single kv head), so any model places on any mesh.
"""

from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

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


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _logical_axes(v: nnx.Variable) -> tuple:
    """A variable's logical names (None per dimension when it has none)."""
    names = v.get_metadata().get("out_sharding")
    ndim = getattr(v.get_value(), "ndim", 0)
    return tuple(names) if names else (None,) * ndim


def logical_spec(state):
    """The logical PartitionSpec of every variable of an nnx.State (or module), same tree."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    return jax.tree.map(
        lambda v: v.replace(PartitionSpec(*_logical_axes(v))), state, is_leaf=_is_variable
    )


def logical_to_mesh(spec, rules: Mapping[str, str | None] = RULES):
    """Map logical PartitionSpecs (a single one or a tree) to mesh-axis PartitionSpecs."""

    def one(p: PartitionSpec) -> PartitionSpec:
        return PartitionSpec(*(None if a is None else rules.get(a) for a in p))

    if isinstance(spec, PartitionSpec):
        return one(spec)
    return jax.tree.map(
        lambda v: v.replace(one(v.get_value())) if _is_variable(v) else one(v),
        spec,
        is_leaf=lambda x: _is_variable(x) or isinstance(x, PartitionSpec),
    )


def fit_spec(axes: tuple, shape: tuple, mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide their dimension or are used twice."""
    used, out = set(), []
    for axis, size in zip(axes, shape, strict=True):
        if axis is None or axis in used or size % mesh.shape[axis]:
            out.append(None)
        else:
            used.add(axis)
            out.append(axis)
    return PartitionSpec(*out)


def mesh_sharding(state, mesh: jax.sharding.Mesh, rules: Mapping[str, str | None] = RULES):
    """NamedShardings for every variable of an nnx.State (concrete or abstract), same tree.

    Use with jax.device_put(state, shardings) or as jit in/out_shardings.
    """
    if isinstance(state, nnx.Module):
        state = nnx.state(state)

    def one(v: nnx.Variable):
        value = v.get_value()
        axes = [None if a is None else rules.get(a) for a in _logical_axes(v)]
        shape = tuple(getattr(value, "shape", ()))
        return v.replace(NamedSharding(mesh, fit_spec(tuple(axes), shape, mesh)))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Batch-major arrays split over "data" along their first dimension."""
    return NamedSharding(mesh, PartitionSpec(RULES["batch"]))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
