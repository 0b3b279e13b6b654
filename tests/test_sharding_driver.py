"""The driver's train step on a (data=4, model=2) mesh of 8 emulated CPU devices gives the
losses of one device (to 1e-5): batches split on `data`, heads / MLP / vocabulary on `model`
(attn.sharding.RULES), from the same data and initial parameters (threefry is partitionable,
so random initialisation does not depend on the sharding). Built from the public pieces of
experiments.train that train.run itself uses; the whole entry point on a mesh is exercised by
tests/test_reliability.py (sharded vs unsharded, resume on another mesh)."""

import jax
import numpy as np

from configs import formal
from experiments import mesh as mesh_lib
from experiments import state as state_lib
from experiments import train
from experiments.validate import validate

STEPS = 3


def losses(data: int, model: int, pe: str = "") -> tuple[list[float], dict[str, str]]:
    config = formal.get_config("smoke=true" + (f",pe={pe}" if pe else ""))
    config.train.mesh.data, config.train.mesh.model = data, model
    validate(config)
    mesh = mesh_lib.make_mesh(config)
    graphdef, state, tx = state_lib.init_train_state(config, mesh=mesh)
    specs = {
        jax.tree_util.keystr(path): str(x.sharding.spec)
        for path, x in jax.tree_util.tree_leaves_with_path(state["params"])
    }
    step_fn = train.make_train_step(config, graphdef, tx)
    batches = train.host_batches(config, seed=config.seed, start=0)
    out = []
    for _, batch in zip(range(STEPS), batches, strict=False):
        state, metrics = step_fn(state, mesh_lib.shard_batch(batch, mesh))
        out.append(float(metrics["loss"]))
    return out, specs


def test_mesh_4x2_matches_one_device():
    assert jax.device_count() == 8
    one, _ = losses(1, 1)
    sharded, specs = losses(4, 2)
    assert any("model" in s for s in specs.values()), specs  # something really is split on `model`
    np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=1e-5)


def test_one_mesh_axis_on_two_dims_is_used_once():
    """FIRE's MLP output kernel is ("mlp", "heads"), both on `model`: the second use replicates
    (a NamedSharding with P("model", "model") is an error) and the losses still match."""
    one, _ = losses(1, 1, pe="fire")
    sharded, specs = losses(4, 2, pe="fire")
    fire_w2 = [spec for path, spec in specs.items() if "pe" in path and "w2" in path]
    assert fire_w2 and set(fire_w2) == {"P('model', None)"}, specs
    assert not [s for s in specs.values() if s.count("model") > 1], specs
    np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=1e-5)
