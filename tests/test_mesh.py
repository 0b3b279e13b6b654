"""experiments/mesh.py: the one map from logical axis names to mesh axes (the path the
driver runs), batch placement and mesh-shape checks. 8 emulated CPU devices."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from attn.models import Decoder
from attn.registry import ConfigError
from configs import formal
from experiments import mesh as mesh_lib


def test_shardings_map_logical_names_onto_the_mesh():
    abstract = nnx.eval_shape(
        lambda: Decoder(
            {"num_layers": 1, "d_model": 16, "num_heads": 4, "num_kv_heads": 1},
            vocab_size=10,
            rngs=nnx.Rngs(0),
        )
    )
    _, state = nnx.split(abstract)
    mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])
    shardings = mesh_lib.shardings(state, mesh)
    attn = shardings["stack"]["blocks"][0]["attn"]
    # q kernel is ("embed", "heads", "head_dim"): heads split over "model".
    assert attn["q"]["kernel"].spec == PartitionSpec(None, "model", None)
    # MQA's single kv head and a vocabulary of 10 on a model axis of 4 cannot split.
    assert attn["k"]["kernel"].spec == PartitionSpec(None, None, None)
    assert shardings["embedder"]["table"].spec == PartitionSpec(None, None)
    placed = jax.device_put(
        nnx.split(
            Decoder(
                {"num_layers": 1, "d_model": 16, "num_heads": 4, "num_kv_heads": 1},
                vocab_size=10,
                rngs=nnx.Rngs(0),
            )
        )[1],
        shardings,
    )
    q = placed["stack"]["blocks"][0]["attn"]["q"]["kernel"].get_value()
    assert q.sharding.spec == PartitionSpec(None, "model", None)


def test_fit_spec_drops_axes_that_do_not_divide_or_repeat():
    mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])
    assert mesh_lib.fit_spec(("model", None), (8, 3), mesh) == PartitionSpec("model", None)
    assert mesh_lib.fit_spec(("model", None), (6, 3), mesh) == PartitionSpec(None, None)
    assert mesh_lib.fit_spec(("model", "model"), (8, 8), mesh) == PartitionSpec("model", None)


def test_shard_batch_splits_rows_over_data():
    mesh = jax.make_mesh((4, 2), ("data", "model"), devices=jax.devices()[:8])
    batch = {"inputs": np.arange(8 * 3).reshape(8, 3)}
    out = mesh_lib.shard_batch(batch, mesh)["inputs"]
    assert out.sharding.spec == PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(out), batch["inputs"])
    stacked = mesh_lib.shard_batch({"x": np.zeros((2, 8, 3))}, mesh, spec=(None, "data"))["x"]
    assert stacked.sharding.spec == PartitionSpec(None, "data")


@pytest.mark.parametrize(
    "data, model, message",
    [
        (8, 2, "train.mesh: data=8 x model=2 = 16 devices, but 8 are available"),
        (-1, 3, "train.mesh: data=2 x model=3"),
        (0, 1, "train.mesh.data: must be >= 1 or -1"),
        (1, 0, "train.mesh.model: must be >= 1, got 0"),
    ],
)
def test_mesh_shape_errors_name_the_field(data, model, message):
    config = formal.get_config("smoke=true")
    config.train.mesh.data, config.train.mesh.model = data, model
    with pytest.raises(ConfigError) as e:
        mesh_lib.mesh_shape(config)
    assert str(e.value).startswith(message), str(e.value)


def test_default_mesh_uses_every_device_for_data():
    config = formal.get_config("smoke=true")
    assert mesh_lib.mesh_shape(config) == (8, 1)
    assert dict(mesh_lib.make_mesh(config).shape) == {"data": 8, "model": 1}
