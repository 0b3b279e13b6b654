"""Positions from the task: samplers composing with a batch's position ids, the offset sampler
(Abacus / position coupling), the models passing batch["positions"] to the sampler, and the
papers' worked examples of Abacus and coupled position ids (experiments/tasks/arithmetic.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn.models
import attn.positions
from attn.registry import ConfigError
from experiments import tasks
from experiments.tasks import NUM_SPECIAL, SEP


def sampler(name, **fields):
    return attn.positions.build({**attn.positions.default_config(name), **fields})


# Two rows of task ids: 0 is "no position" (an operator, a separator, padding).
BASE = np.array([[3, 2, 1, 0, 3, 2, 1, 0, 0, 0], [1, 2, 0, 1, 2, 3, 0, 1, 2, 0]], np.int32)


@pytest.mark.parametrize("name", sorted(attn.positions.REGISTRY))
@pytest.mark.parametrize("train", [True, False])
def test_every_sampler_keeps_zero_order_and_ties_of_task_ids(name, train):
    s = sampler(name)
    pos = np.asarray(s(2, 10, train=train, rng=jax.random.key(3), base_BL=jnp.asarray(BASE)))
    assert pos.shape == BASE.shape
    assert np.all(pos[BASE == 0] == 0)
    for row, base in zip(pos, BASE, strict=True):
        for p, q in [(p, q) for p in range(10) for q in range(10)]:
            if base[p] == base[q]:
                assert row[p] == row[q]
            if base[p] < base[q]:
                assert row[p] < row[q]
    assert pos.max() <= s.max_position(10)


def test_identity_and_interpolated_pass_task_ids_through():
    base = jnp.asarray(BASE)
    np.testing.assert_array_equal(sampler("identity")(2, 10, train=True, base_BL=base), BASE)
    pos = sampler("interpolated", factor=0.5)(2, 10, train=True, base_BL=base)
    np.testing.assert_allclose(pos, BASE * 0.5)


def test_offset_adds_one_k_per_batch_or_per_sequence():
    base = jnp.asarray(BASE)
    seen = set()
    for seed in range(30):
        pos = np.asarray(
            sampler("offset", max_offset=5)(
                2, 10, train=True, rng=jax.random.key(seed), base_BL=base
            )
        )
        k = pos - BASE
        assert np.all(k[BASE == 0] == 0)  # no-position ids stay 0
        ks = set(k[BASE > 0].tolist())
        assert len(ks) == 1 and 0 <= ks.pop() <= 5  # one k for the whole batch (Abacus code)
        seen.add(int(k[BASE > 0][0]))
    assert seen == set(range(6))  # k ~ U{0..max_offset}
    per = sampler("offset", max_offset=50, per_sequence=True)
    pos = np.asarray(per(2, 10, train=True, rng=jax.random.key(0), base_BL=base))
    k0, k1 = (pos - BASE)[0, 0], (pos - BASE)[1, 0]
    assert k0 != k1
    # evaluation: no offset unless at_eval
    np.testing.assert_array_equal(
        per(2, 10, train=False, rng=jax.random.key(0), base_BL=base), BASE
    )
    on = sampler("offset", max_offset=50, at_eval=True)
    assert not np.array_equal(on(2, 10, train=False, rng=jax.random.key(1), base_BL=base), BASE)


def test_offset_bounded_by_the_table_draws_every_start():
    """Cho et al.'s random start s in [1, max_pos - len]: with max_len rows every id stays in
    the table, and every start that fits is drawn."""
    s = sampler("offset", max_offset=-1, max_len=8, per_sequence=True)
    base = jnp.asarray([[1, 2, 3, 0], [1, 2, 3, 4]])
    tops = {0: set(), 1: set()}
    for seed in range(60):
        pos = np.asarray(s(2, 4, train=True, rng=jax.random.key(seed), base_BL=base))
        assert pos.max() <= 7
        for r in (0, 1):
            tops[r].add(int(pos[r].max()))
    assert tops[0] == {3, 4, 5, 6, 7} and tops[1] == {4, 5, 6, 7}
    assert s.max_position(4) == 7 and s.max_position(20) == 19


def test_offset_without_task_ids_moves_every_real_slot_and_respects_padding():
    s = sampler("offset", max_offset=-1, max_len=12)
    for seed in range(20):
        pos = np.asarray(s(1, 10, train=True, rng=jax.random.key(seed), valid_B=jnp.asarray([4])))
        k = pos[0, 0]
        np.testing.assert_array_equal(pos[0], np.arange(10) + k)
        assert pos[0, 3] <= 11  # the last real token fits the table; padding may not
    assert sampler("offset").max_position(10) == 9 + 99


def test_offset_config_errors():
    with pytest.raises(ConfigError, match=r"^positions.max_offset: -1 \(bounded by max_len"):
        sampler("offset", max_offset=-1)
    with pytest.raises(ConfigError, match=r"^positions.max_offset: an int >= 0"):
        sampler("offset", max_offset=-3)
    with pytest.raises(ConfigError, match=r"^positions.bogus"):
        sampler("offset", bogus=1)


# ------------------------------------------------------------------ the models use the ids


def _model(name="decoder", **fields):
    cfg = {
        **attn.models.default_config(name),
        "num_layers": 1,
        "d_model": 16,
        "num_heads": 2,
        "num_kv_heads": 2,
        "mlp_dim": 32,
        "dropout": 0.0,
        "pe": {"name": "learned", "max_len": 64, "extension": "error", "init_std": 0.5},
        **fields,
    }
    return attn.models.build(cfg, vocab_size=12, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["decoder", "encoder", "looped"])
def test_batch_positions_reach_the_encoding(name):
    model = _model(name)
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, 12, size=(2, 8)), jnp.int32)
    plain = model({"inputs": tokens}, train=False)
    ids = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    same = model({"inputs": tokens, "positions": ids}, train=False)
    np.testing.assert_allclose(same, plain, atol=1e-6)  # 0..L-1 given = identity
    moved = model({"inputs": tokens, "positions": ids * 2}, train=False)
    assert not np.allclose(moved, plain, atol=1e-3)


def test_offset_sampler_moves_task_ids_in_training_only():
    model = _model(positions={"name": "offset", "max_offset": 20, "max_len": 0})
    mask = jnp.ones((1, 6), bool)
    ids = jnp.asarray([[1, 2, 0, 1, 2, 3]], jnp.int32)
    seen = {tuple(np.asarray(model.positions(1, 6, train=True, mask_BL=mask, base_BL=ids))[0])}
    for _ in range(5):
        seen.add(tuple(np.asarray(model.positions(1, 6, train=True, mask_BL=mask, base_BL=ids))[0]))
    assert len(seen) > 1 and all(p[2] == 0 for p in seen)
    evaluated = model.positions(1, 6, train=False, mask_BL=mask, base_BL=ids)
    np.testing.assert_array_equal(evaluated, ids)


# --------------------------------------------------------------- papers' worked examples


def _decoder_row(task, x_digits_text):
    """The decoder batch of one hand-written example (task symbols as text)."""
    sym = {"+": task.op, "*": task.op}
    x, y = x_digits_text.split("=")
    to = lambda t: np.array([sym[c] if c in sym else int(c) for c in t.split()], np.int32)
    return task.lay_out([(to(x), to(y))], "decoder")


def test_coupled_positions_worked_example():
    """Cho et al. 2024, Figure 1 / reference code: 653 + 49 = 702, operands zero-padded,
    answer reversed and padded (0207); '+' and '=' at the start id s, a digit of
    significance i at s + i: 6 5 3 -> s+3 s+2 s+1, 0 4 9 likewise, the answer 2 0 7 0 ->
    s+1 .. s+4. Our start id is 1 (the offset sampler moves it while training)."""
    task = tasks.build({"name": "long_addition", "pad": True, "positions": "coupled"})
    batch = _decoder_row(task, "6 5 3 + 0 4 9 = 2 0 7 0")
    real = int(batch["token_mask"][0].sum())
    assert batch["inputs"][0, 7] == SEP
    assert batch["positions"][0, :real].tolist() == [4, 3, 2, 1, 4, 3, 2, 1, 2, 3, 4, 5]
    assert batch["targets"][0, 7:real].tolist() == [v + NUM_SPECIAL for v in (2, 0, 7, 0)] + [SEP]
    # generated examples carry the same ids
    rng = np.random.default_rng(0)
    b = task.train_batch(rng, 6, 4, "decoder")
    for row in range(4):
        toks, pos = b["inputs"][row], b["positions"][row]
        k = int(np.flatnonzero(toks == task.op + NUM_SPECIAL)[0])
        width = k  # padded operands share one width
        assert pos[:k].tolist() == list(range(width + 1, 1, -1))
        assert pos[k] == 1 and pos[2 * k + 1] == 1  # '+' and '='
        m = int(b["token_mask"][row].sum()) - (2 * k + 2)
        assert pos[2 * k + 2 : 2 * k + 2 + m].tolist() == list(range(2, m + 2))


def test_abacus_positions_worked_example():
    """McLeish et al. 2024, Figure 2: numbers written least significant digit first; each
    digit's id is its index inside its own number (1 for the first digit), operators and '='
    get 0. 123 + 45 = 168 in the reversed format: 3 2 1 + 5 4 = 8 6 1 -> 1 2 3 0 1 2 0 1 2 3."""
    task = tasks.build({"name": "long_addition", "reverse_operands": True, "positions": "abacus"})
    batch = _decoder_row(task, "3 2 1 + 5 4 = 8 6 1")
    real = int(batch["token_mask"][0].sum())
    assert batch["positions"][0, :real].tolist() == [1, 2, 3, 0, 1, 2, 0, 1, 2, 3]
    assert batch["positions"][0, real:].tolist() == [0] * (batch["inputs"].shape[1] - real)


def test_abacus_reference_semantics_on_random_batches():
    """The ids equal 'index within the run of consecutive digit tokens, 0 elsewhere', computed
    here directly from the laid-out tokens (the reference implementation's definition)."""
    task = tasks.build({"name": "number_sort", "positions": "abacus"})
    b = task.train_batch(np.random.default_rng(1), 6, 8, "decoder")
    is_digit = (b["inputs"] >= NUM_SPECIAL) & (b["inputs"] < NUM_SPECIAL + 10)
    want = np.zeros_like(b["inputs"])
    for r in range(len(want)):
        run = 0
        for t in range(want.shape[1]):
            run = run + 1 if is_digit[r, t] else 0
            want[r, t] = run
    np.testing.assert_array_equal(b["positions"], want)


def test_task_ids_stay_below_the_padded_length():
    for fields in (
        {"positions": "coupled"},
        {"positions": "abacus"},
        {"positions": "coupled", "pad": True},
    ):
        for name in ("long_addition", "long_multiplication"):
            task = tasks.build({"name": name, **fields})
            for n in (1, 3, 20):
                b = task.train_batch(np.random.default_rng(n), n, 16, "decoder")
                assert b["positions"].max() < b["inputs"].shape[1]
                assert np.all(b["positions"][~b["token_mask"]] == 0)
