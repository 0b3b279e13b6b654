"""The driver on a (data=4, model=2) mesh of 8 emulated CPU devices gives the losses of one
device (to 1e-5): batches split on `data`, heads / MLP / vocabulary on `model`
(attn.sharding.RULES), with the same data and initial parameters (threefry is partitionable,
so random initialisation does not depend on the sharding)."""

import json

import jax
import numpy as np

from configs import formal
from experiments import train


def losses(workdir) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def tiny(tmp_path, data: int, model: int):
    config = formal.get_config("smoke=true")
    config.train.steps, config.train.log_every = 3, 1
    config.train.mesh.data, config.train.mesh.model = data, model
    config.eval.lengths, config.eval.data_dir = "4", str(tmp_path / "data")
    config.eval.compilation_cache = ""  # in-process: leave pytest's JAX config alone
    return config


def test_mesh_4x2_matches_one_device(tmp_path):
    assert jax.device_count() == 8
    train.run(tiny(tmp_path, 1, 1), str(tmp_path / "one"))
    sharded = tiny(tmp_path, 4, 2)
    mesh = train.make_mesh(sharded)
    _, state, _ = train.init_train_state(sharded, mesh=mesh)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state["params"])}
    assert any("model" in s for s in specs), specs  # something really is split on `model`
    train.run(sharded, str(tmp_path / "mesh"))
    np.testing.assert_allclose(
        losses(tmp_path / "mesh"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-5
    )
