"""Memory knobs: model.remat leaves gradients unchanged, train.grad_accum_steps equals the one
big batch (driver and vmapped seeds), and an fsdp mesh axis shards parameters and optimizer
state over 8 emulated devices with the losses of one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn.models
from attn.registry import ConfigError
from configs import formal
from experiments import mesh as mesh_lib
from experiments import metrics, seeds, train
from experiments import state as state_lib
from experiments.validate import validate


def _grads(remat: str, scan: bool):
    cfg = attn.models.default_config("decoder")
    cfg.update(num_layers=2, d_model=32, num_heads=4, mlp_dim=64, dropout=0.1, remat=remat)
    cfg["scan_layers"] = scan
    model = attn.models.build(cfg, vocab_size=16, rngs=state_lib.rngs(0))
    x = np.random.default_rng(0).integers(4, 16, (4, 12)).astype(np.int32)
    mask = np.arange(12)[None, :] < np.array([12, 12, 9, 5])[:, None]
    batch = {"inputs": x, "targets": x, "loss_mask": mask.astype(np.float32), "token_mask": mask}
    graphdef, params, rest = state_lib.split_model(model)

    def value_and_grad(params, rest):
        m = nnx.merge(graphdef, params, rest)
        return nnx.value_and_grad(lambda m: metrics.loss_and_metrics(m, batch, train=True)[0])(m)

    fn = jax.jit(value_and_grad)
    memory = fn.lower(params, rest).compile().memory_analysis()
    return fn(params, rest), getattr(memory, "temp_size_in_bytes", None)


@pytest.mark.parametrize(
    "scan",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # scanned: ~10 s more
)
def test_remat_gradients_equal_no_remat(scan):
    """Dropout on: the recomputed forward draws the same masks."""
    (loss0, g0), temp0 = _grads("none", scan)
    for policy in ("block", "dots"):
        (loss, g), temp = _grads(policy, scan)
        assert float(loss) == float(loss0)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
        if scan and policy == "block" and temp0 and temp:
            assert temp < temp0  # the scanned blocks keep only their inputs


def test_unknown_remat_policy_names_the_field():
    cfg = attn.models.default_config("decoder")
    cfg["remat"] = "everything"
    with pytest.raises(ConfigError, match="model.remat"):
        attn.models.build(cfg, vocab_size=16, rngs=state_lib.rngs(0))


def _config(k=1, **mesh):
    config = formal.get_config("smoke=true")
    config.train.batch_size = 8
    config.train.grad_accum_steps = k
    config.train.mesh.data = mesh.get("data", 1)
    config.train.mesh.fsdp = mesh.get("fsdp", 1)
    return config


def _train(config, steps=2):
    mesh = mesh_lib.make_mesh(config)
    graphdef, state, tx = state_lib.init_train_state(config, mesh=mesh)
    step_fn = train.make_train_step(config, graphdef, tx)
    out = []
    for _, batch in zip(range(steps), train.host_batches(config, seed=0, start=0), strict=False):
        state, m = step_fn(state, mesh_lib.shard_batch(batch, mesh))
        out.append({k: float(m[k]) for k in ("loss", "token_acc", "seq_acc", "grad_norm")})
    return out, state


def test_grad_accum_equals_the_big_batch():
    want, state1 = _train(_config(1), steps=1)
    got, state4 = _train(_config(4), steps=1)
    for a, b in zip(want, got, strict=True):
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
    for a, b in zip(
        jax.tree.leaves(state1["params"]), jax.tree.leaves(state4["params"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two compilations of a vmapped step: ~25 s on 2 cores
def test_grad_accum_under_vmapped_seeds():
    def run(k):
        config = _config(k)
        configs = [seeds.seed_config(config, s) for s in (0, 1)]
        tx = train.optim.make_optimizer(config)
        graphdef, states = seeds.init_states(configs, mesh_lib.make_mesh(config), tx)
        step = seeds.make_vmapped_step(config, graphdef, tx)
        batch = seeds.stack_batches(
            [next(train.host_batches(c, seed=c.seed, start=0)) for c in configs]
        )
        _, m = step(seeds.stack(states), jax.tree.map(jnp.asarray, batch))
        return np.asarray(m["loss"]), np.asarray(m["grad_norm"])

    for a, b in zip(run(1), run(2), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5)


def test_grad_accum_must_divide_the_batch():
    config = _config(3)
    mesh = mesh_lib.make_mesh(config)
    graphdef, _, tx = state_lib.init_train_state(_config(1), mesh=mesh)
    with pytest.raises(ConfigError, match="train.grad_accum_steps: 3 does not divide"):
        train.make_train_step(config, graphdef, tx)


def test_float16_is_refused_in_one_line():
    config = _config(1)
    config.model.dtype = "float16"
    with pytest.raises(ConfigError, match="^model.dtype: float16 needs loss scaling"):
        train.check_training(config)


def _device_bytes(tree, device) -> int:
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == device
    )


def test_fsdp_shards_params_and_adam_state_with_the_losses_of_one_device():
    assert jax.device_count() == 8
    one, _ = _train(_config(1), steps=3)
    config = _config(1, data=1, fsdp=8)
    validate(config)
    sharded, state = _train(config, steps=3)
    np.testing.assert_allclose(
        [r["loss"] for r in sharded], [r["loss"] for r in one], rtol=1e-5, atol=1e-5
    )
    dev = jax.devices()[0]
    for part in ("params", "opt"):
        leaves = [x for x in jax.tree.leaves(state[part]) if x.ndim]
        expected = sum(
            x.nbytes // 8 if "fsdp" in jax.tree.leaves(tuple(x.sharding.spec)) else x.nbytes
            for x in leaves
        )
        scalars = sum(x.nbytes for x in jax.tree.leaves(state[part]) if not x.ndim)
        assert _device_bytes(state[part], dev) == expected + scalars
    # Every weight matrix is split: what stays whole is small (biases of the vocab, counts).
    params = state["params"]
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert _device_bytes(params, dev) < total / 4
    assert mesh_lib.mesh_shape(config) == (8, 1)
    assert dict(mesh_lib.make_mesh(config).shape) == {"data": 1, "fsdp": 8, "model": 1}


def test_fsdp_mesh_errors_name_the_field():
    config = _config(1, data=-1, fsdp=3)
    with pytest.raises(ConfigError, match="train.mesh: data=2 x fsdp=3"):
        mesh_lib.mesh_axes(config)
    config.train.mesh.fsdp = 0
    with pytest.raises(ConfigError, match="train.mesh.fsdp"):
        mesh_lib.mesh_axes(config)
