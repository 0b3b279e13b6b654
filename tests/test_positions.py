"""Position samplers (attn.positions): identity, randomized (Ruoss et al. 2023), interpolated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn.positions
from attn.registry import ConfigError


def build(name, **fields):
    return attn.positions.build({**attn.positions.default_config(name), **fields})


@pytest.mark.parametrize("name", sorted(attn.positions.REGISTRY))
@pytest.mark.parametrize("train", [True, False])
def test_contract(name, train):
    sampler = build(name)
    pos = sampler(3, 10, train=train, rng=jax.random.key(0))
    assert pos.shape == (3, 10)
    assert pos.dtype in (jnp.int32, jnp.float32)
    p = np.asarray(pos)
    assert np.all(np.diff(p, axis=1) > 0)  # strictly increasing: order is what matters
    assert p.min() >= 0 and p.max() <= sampler.max_position(10)
    jitted = jax.jit(lambda key: sampler(3, 10, train=train, rng=key))(jax.random.key(0))
    np.testing.assert_array_equal(jitted, pos)


def test_identity():
    pos = build("identity")(2, 5, train=True, rng=None)
    np.testing.assert_array_equal(pos, [[0, 1, 2, 3, 4]] * 2)
    assert pos.dtype == jnp.int32
    assert build("identity").max_position(5) == 4


@pytest.mark.parametrize("per_sequence", [False, True])
def test_randomized_sorted_unique_in_range_deterministic(per_sequence):
    sampler = build("randomized", max_len=50, per_sequence=per_sequence)
    pos = np.asarray(sampler(4, 20, train=True, rng=jax.random.key(1)))
    assert pos.dtype == np.int32
    assert np.all(np.diff(pos, axis=1) > 0)  # sorted and unique
    assert pos.min() >= 0 and pos.max() < 50
    again = sampler(4, 20, train=True, rng=jax.random.key(1))
    np.testing.assert_array_equal(again, pos)
    other = sampler(4, 20, train=True, rng=jax.random.key(2))
    assert not np.array_equal(other, pos)
    rows_equal = all(np.array_equal(pos[0], row) for row in pos)
    assert rows_equal != per_sequence  # one vector per batch unless per_sequence


def test_randomized_covers_the_range():
    sampler = build("randomized", max_len=16)
    seen = np.concatenate(
        [np.asarray(sampler(1, 4, train=True, rng=jax.random.key(i)))[0] for i in range(40)]
    )
    assert set(seen) == set(range(16))


def test_randomized_full_length_is_identity():
    pos = build("randomized", max_len=8)(2, 8, train=True, rng=jax.random.key(0))
    np.testing.assert_array_equal(pos, np.tile(np.arange(8), (2, 1)))


def test_randomized_off_at_eval_unless_at_eval():
    off = build("randomized", max_len=100)
    np.testing.assert_array_equal(off(2, 6, train=False, rng=jax.random.key(0)), [range(6)] * 2)
    on = build("randomized", max_len=100, at_eval=True)
    pos = np.asarray(on(2, 6, train=False, rng=jax.random.key(0)))
    assert not np.array_equal(pos[0], np.arange(6))
    assert on.max_position(6) == 99
    assert off.max_position(6) == 99  # training still emits up to max_len - 1
    assert off.max_position(500) == 499


def test_randomized_errors():
    with pytest.raises(ConfigError) as err:
        build("randomized", max_len=8)(1, 9, train=True, rng=jax.random.key(0))
    assert str(err.value) == "positions.max_len: length 9 is longer than max_len 8; raise max_len"
    with pytest.raises(ConfigError, match=r"^positions.max_len: length 9 is longer"):
        build("randomized", max_len=8, at_eval=True).max_position(9)


def test_interpolated_scales():
    sampler = build("interpolated", factor=0.25)
    pos = sampler(2, 5, train=True, rng=None)
    assert pos.dtype == jnp.float32
    np.testing.assert_allclose(pos, [[0, 0.25, 0.5, 0.75, 1.0]] * 2)
    np.testing.assert_array_equal(sampler(2, 5, train=False, rng=None), pos)
    assert sampler.max_position(5) == 1
    assert build("interpolated", factor=3.0).max_position(5) == 12


def test_config_errors():
    with pytest.raises(ConfigError) as err:
        attn.positions.build({"name": "randomized", "max_length": 10})
    assert str(err.value) == (
        "positions.max_length: unknown field for 'randomized'; allowed: at_eval, max_len, "
        "per_sequence"
    )
    with pytest.raises(ConfigError, match=r"^positions.name: unknown name 'shuffled'; valid"):
        attn.positions.build({"name": "shuffled"})
    with pytest.raises(ConfigError, match=r"^positions.factor: must be > 0$"):
        build("interpolated", factor=0.0)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_randomized_draws_exactly_the_real_tokens_of_a_padded_row(per_sequence):
    """A row of 3 real tokens padded to 12 gets a uniform 3-subset of [0, 16), not the 3
    smallest of a 12-subset: E[largest] = 3 * 17 / 4 - 1 = 11.75 (the padded draw gives ~2.9).
    """
    sampler = attn.positions.Randomized({"max_len": 16, "per_sequence": per_sequence})
    draw = jax.jit(lambda key: sampler(2, 12, train=True, rng=key, valid_B=jnp.array([3, 3])))
    pos = np.stack([np.asarray(draw(k)) for k in jax.random.split(jax.random.key(0), 400)])
    real = pos[:, :, :3]
    assert (np.diff(real, axis=-1) > 0).all() and real.min() >= 0 and real.max() < 16
    np.testing.assert_allclose(real.max(-1).mean(), 11.75, atol=0.3)
    assert (pos[:, :, 3:] == 15).all()
    full = sampler(2, 12, train=True, rng=jax.random.key(1))
    same = sampler(2, 12, train=True, rng=jax.random.key(1), valid_B=jnp.array([12, 12]))
    np.testing.assert_array_equal(full, same)
