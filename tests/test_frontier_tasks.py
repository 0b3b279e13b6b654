"""The frontier tasks (experiments/tasks/arithmetic.py, retrieval.py, scan.py): worked
examples from the papers, every format option against the independent checkers of
tests/test_tasks.py, ragged batches, evaluation sets, and SCAN's published counts.

The shared contract tests of tests/test_tasks.py (determinism, shapes, checkers on the
default formats) cover these tasks through the registry; this file adds what is specific.
"""

import hashlib
import itertools

import numpy as np
import pytest
from test_tasks import check

from attn.registry import ConfigError
from experiments import tasks
from experiments.tasks import BLANK, EOS, NUM_SPECIAL, SEP, scan


def build(name, **kw):
    return tasks.build({"name": name, **kw})


def symbols(task, text):
    """Task symbols of a hand-written row: digits, '+', '*', ','."""
    table = {"+": getattr(task, "op", None), "*": getattr(task, "op", None)}
    table[","] = getattr(task, "COMMA", None)
    return [table[c] if c in table else int(c) for c in text.split()]


# ------------------------------------------------------------------------ arithmetic

ARITHMETIC_FORMATS = [
    {},
    {"reverse_operands": True},
    {"reverse_answer": False},
    {"pad": True},
    {"pad": True, "reverse_operands": True, "reverse_answer": False},
    {"index_hints": True},
    {"index_hints": True, "reverse_answer": False, "random_hints": False},
    {"index_hints": True, "pad": True, "reverse_operands": True},
    {"positions": "abacus", "reverse_operands": True},
    {"positions": "coupled", "pad": True},
]


@pytest.mark.parametrize("name", ["long_addition", "long_multiplication"])
@pytest.mark.parametrize("fields", ARITHMETIC_FORMATS, ids=lambda f: ",".join(f) or "default")
def test_every_arithmetic_format_against_the_checker(name, fields):
    task = build(name, **fields)
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 30):
        x, y, m = task.batch(rng, n, 16)
        for i in range(len(x)):
            check(name, x[i], y[i], m[i], task)
    for cell in [(1, 9), (9, 1), (12, 12)]:
        e = task.grid_examples(5, range(6), cell)
        for i in range(6):
            x, y, m = e["input"][i] - NUM_SPECIAL, e["output"][i] - NUM_SPECIAL, e["output_mask"][i]
            check(name, x, y, m, task)
            k = list(x).index(task.op)
            per = 2 if task.hints else 1
            width = max(cell) if task.cfg["pad"] else None
            assert k // per == (width or cell[0])  # the cell's lengths, before padding
            if not task.cfg["pad"]:
                assert (len(x) - list(x[::-1]).index(task.op) - 1) == k
                b = [t for t in x[k + 1 :] if t != task.fill]
                assert len(b) // per == cell[1]


def test_addition_worked_examples():
    """97 + 5 = 102 in each format (module docstring of experiments/tasks/arithmetic.py)."""
    add = build("long_addition")
    rows = add.rows(
        np.array([symbols(add, "9 7 + 5") + [add.fill] * 2]), np.array([[2, 0, 1, 0]]),
        np.array([[True] * 3 + [False]]),
    )  # fmt: skip
    check("long_addition", *[list(v) for v in rows[0]], [True] * 3, add)
    batch = add.lay_out(rows, "decoder")
    want_in = [9, 7, add.op, 5]
    real = int(batch["token_mask"][0].sum())
    assert batch["inputs"][0, :real].tolist() == [v + NUM_SPECIAL for v in want_in] + [SEP] + [
        v + NUM_SPECIAL for v in (2, 0, 1)
    ]
    assert batch["targets"][0, 4:real].tolist() == [v + NUM_SPECIAL for v in (2, 0, 1)] + [EOS]
    assert batch["loss_mask"][0].tolist() == [0.0] * 4 + [1.0] * 4 + [0.0] * (16 - 8)
    # pad + reverse_operands: 7 9 + 5 0 -> 2 0 1
    padded = build("long_addition", pad=True, reverse_operands=True)
    check("long_addition", symbols(padded, "7 9 + 5 0"), [2, 0, 1], [True] * 3, padded)
    with pytest.raises(AssertionError):
        check("long_addition", symbols(padded, "7 9 + 5 0"), [1, 0, 2], [True] * 3, padded)


def test_multiplication_worked_example():
    mul = build("long_multiplication")
    check("long_multiplication", symbols(mul, "1 2 * 3 4"), [8, 0, 4], [True] * 3, mul)
    padded = build("long_multiplication", pad=True, reverse_answer=False)
    check("long_multiplication", symbols(padded, "1 2 * 3 4"), [0, 4, 0, 8], [True] * 4, padded)


def test_index_hints_name_significance():
    """Zhou et al. 2024's index hints: equal hints on digits of equal significance; with
    random_hints the hint sequence starts anywhere in training, at hint 0 in evaluation."""
    task = build("long_addition", index_hints=True, num_hints=110)
    e = task.example(0, 0, 3)
    x = (e["input"] - NUM_SPECIAL).tolist()
    y = (e["output"][e["output_mask"]] - NUM_SPECIAL).tolist()
    hint = lambda h: 10 + h
    assert x[0::2][:3] == [hint(2), hint(1), hint(0)]  # most significant digit first
    assert y[0::2] == [hint(0), hint(1), hint(2), hint(3)][: len(y) // 2]  # answer reversed
    starts = set()
    for seed in range(20):
        x, _, _ = task.batch(np.random.default_rng(seed), 3, 1)
        k = list(x[0]).index(task.op)
        starts.add(int(x[0, k - 2]) - 10)  # the least significant digit of a
    assert len(starts) > 5 and max(starts) <= 110 - 4
    with pytest.raises(ConfigError, match=r"^task.num_hints: 64 hint symbols cannot mark"):
        build("long_addition", index_hints=True, num_hints=64)
    with pytest.raises(ConfigError, match=r"^task.positions: 'abacus' with index_hints"):
        build("long_addition", index_hints=True, positions="abacus")
    with pytest.raises(ConfigError, match=r"^task.positions: unknown 'nope'"):
        build("long_addition", positions="nope")


def test_operand_lengths_are_independent_and_cover_the_range():
    task = build("long_addition", max_length=6)
    x, _, _ = task.batch(np.random.default_rng(0), 6, 2000)
    pairs = set()
    for row in x:
        row = [t for t in row if t != task.fill]
        k = row.index(task.op)
        pairs.add((k, len(row) - k - 1))
    assert pairs == set(itertools.product(range(1, 7), repeat=2))


def test_evaluation_example_is_the_diagonal_cell():
    task = build("long_addition")
    one = task.example(3, 7, 5)
    cell = task.grid_examples(3, [7], (5, 5))
    for k in one:
        np.testing.assert_array_equal(one[k], cell[k][0])
    assert list(one["input"] - NUM_SPECIAL).index(task.op) == 5


def test_number_sort_worked_example_and_formats():
    task = build("number_sort", reverse_operands=False)
    x = symbols(task, "3 1 , 2 , 1 0")
    check("number_sort", x, symbols(task, "2 , 1 0 , 3 1"), [True] * 7, task)
    with pytest.raises(AssertionError):
        check("number_sort", x, symbols(task, "1 0 , 2 , 3 1"), [True] * 7, task)
    rev = build("number_sort", positions="abacus")
    rng = np.random.default_rng(2)
    for n in (1, 4, 9):
        xs, ys, ms = rev.batch(rng, n, 8)
        for i in range(8):
            check("number_sort", xs[i], ys[i], ms[i], rev)
    with pytest.raises(ConfigError, match=r"^task.positions: 'coupled' is defined"):
        build("number_sort", positions="coupled")


def test_ragged_decoder_batch_rows_and_padding():
    task = build("long_addition", positions="abacus", reverse_operands=True)
    b = task.train_batch(np.random.default_rng(0), 8, 32, "decoder")
    lengths = b["token_mask"].sum(1)
    assert len(set(lengths.tolist())) > 3  # rows differ in length
    for r in range(32):
        n = int(lengths[r])
        assert np.all(b["inputs"][r, n:] == 0) and np.all(b["loss_mask"][r, n:] == 0)
        sep = int(np.flatnonzero(b["inputs"][r] == SEP)[0])
        assert b["loss_mask"][r, sep:n].all() and not b["loss_mask"][r, :sep].any()
        assert b["targets"][r, n - 1] == EOS
    assert task.sequence_length(8, "decoder") >= int(lengths.max())


def test_grid_eval_batches_are_laid_out_from_records():
    task = build("long_multiplication", positions="coupled")
    records = task.grid_examples(0, range(5), (3, 7))
    rows = [{k: v[i] for k, v in records.items()} for i in range(5)]
    b = task.eval_batch(rows, "decoder")
    assert b["inputs"].shape[0] == 5 and "positions" in b
    assert b["positions"].max() < b["inputs"].shape[1]


# ------------------------------------------------------------------------- retrieval


def test_passkey_worked_example_and_depths():
    task = build("passkey", num_filler=4)
    key, query = task.keys, task.query
    f = task.filler
    x = [f, f + 1, key, 4, 0, 7, 1, 1, f + 2, query, key]
    check("passkey", x, [4, 0, 7, 1, 1], [True] * 5, task)
    depths = set()
    for seed in range(40):
        x, y, _ = task.batch(np.random.default_rng(seed), 10, 1)
        pos = int(np.flatnonzero(x[0] == key)[0])
        depths.add(pos)
        assert x[0, pos + 1 : pos + 6].tolist() == y[0].tolist()
    assert len(depths) > 6 and min(depths) >= 0 and max(depths) <= 10


def test_needle_multi_key_and_multi_query():
    task = build("needle", num_needles=5, num_queries=3, value_digits=2)
    x, y, m = task.batch(np.random.default_rng(0), 40, 32)
    assert x.shape == (32, task.input_length(40)) and y.shape == (32, 6)
    for i in range(32):
        check("needle", x[i], y[i], m[i], task)
    with pytest.raises(ConfigError, match=r"^task.num_queries: 3 queries of 2 needles"):
        build("needle", num_needles=2, num_queries=3)
    with pytest.raises(ConfigError, match=r"^task.num_keys: 2 keys cannot name 4"):
        build("needle", num_keys=2)


def test_flip_flop_worked_example_probabilities_and_read_scoring():
    task = build("flip_flop")
    w, r, i = task.WRITE, task.READ, task.IGNORE
    x = [w, 1, i, 0, r, 1, w, 0, r, 0]
    check("flip_flop", x, [0, 0, 1, 0, 0], [False, False, True, False, True], task)
    with pytest.raises(AssertionError):  # a read must return the last write
        check("flip_flop", [w, 1, w, 0, r, 1], [0, 0, 1], [False, False, True], task)
    x, _, m = task.batch(np.random.default_rng(0), 400, 50)
    ops = x[:, 2:-2:2]
    assert abs(np.mean(ops == i) - 0.8) < 0.01 and abs(np.mean(ops == w) - 0.1) < 0.01
    sparse = build("flip_flop", eval_p_ignore=0.98)
    e = sparse.example(0, 0, 2000)
    assert abs(np.mean(e["input"][2:-2:2] - NUM_SPECIAL == i) - 0.98) < 0.01
    # training scores every next token; evaluation only the read bits
    train = task.train_batch(np.random.default_rng(1), 20, 4, "decoder")
    assert train["loss_mask"].sum() == 4 * (2 * 21 - 1)
    records = [task.example(0, j, 20) for j in range(4)]
    ev = task.eval_batch(records, "decoder")
    for j, rec in enumerate(records):
        scored = np.flatnonzero(ev["loss_mask"][j])
        assert len(scored) == rec["output_mask"].sum() >= 1
        assert np.all(ev["inputs"][j, scored] == r + NUM_SPECIAL)  # the token before is a read
        np.testing.assert_array_equal(ev["targets"][j, scored], rec["output"][rec["output_mask"]])
    reads_only = build("flip_flop", loss="reads").train_batch(
        np.random.default_rng(1), 20, 4, "decoder"
    )
    assert reads_only["loss_mask"].sum() < train["loss_mask"].sum()


# ------------------------------------------------------------------------------ SCAN

# sha256 of the sorted lines of brendenlake/SCAN length_split/tasks_{train,test}_length.txt
SCAN_TRAIN_SHA = "114e6bdb1575f27d8d6d4449081970cef4846b2ec89b260dc2a0e5297c3e75d5"
SCAN_TEST_SHA = "45bb5e5f0e0678da016725d880ba4349267b93262762a2c66f9b51b04535a2ce"


def test_scan_counts_and_the_published_length_split():
    cmds = scan.commands()
    assert len(cmds) == 20910 and len({c for c, _ in cmds}) == 20910
    train = sorted(scan.published_line(c, a) for c, a in cmds if len(a) <= 22)
    test = sorted(scan.published_line(c, a) for c, a in cmds if len(a) > 22)
    assert (len(train), len(test)) == (16990, 3920)
    assert not any(len(a) == 23 for _, a in cmds)
    assert {len(a) for _, a in cmds if len(a) > 22} == {24, 25, 26, 27, 28, 30, 32, 33, 36, 40, 48}
    assert hashlib.sha256("\n".join(train).encode()).hexdigest() == SCAN_TRAIN_SHA
    assert hashlib.sha256("\n".join(test).encode()).hexdigest() == SCAN_TEST_SHA


@pytest.mark.parametrize(
    "command,actions",
    [  # brendenlake/SCAN README
        ("jump", "JUMP"),
        ("jump left", "LTURN JUMP"),
        ("jump around right", "RTURN JUMP RTURN JUMP RTURN JUMP RTURN JUMP"),
        ("turn left twice", "LTURN LTURN"),
        ("jump thrice", "JUMP JUMP JUMP"),
        ("jump opposite left and walk thrice", "LTURN LTURN JUMP WALK WALK WALK"),
        (
            "jump opposite left after walk around left",
            "LTURN WALK LTURN WALK LTURN WALK LTURN WALK LTURN LTURN JUMP",
        ),
    ],
)
def test_scan_worked_examples(command, actions):
    assert dict(scan.commands())[command] == tuple(actions.split())


def test_scan_training_pool_and_evaluation_sets():
    task = build("scan")
    x, y, m = task.batch(np.random.default_rng(0), 22, 4000)
    counts = m.sum(1)
    assert counts.max() <= 22 and len(set(counts.tolist())) > 15
    source = task.eval_source(24, num_examples=10_000, seed=1)
    assert len(source) == 336  # every test command of 24 actions
    assert len(task.eval_source(23, num_examples=100, seed=1)) == 0
    assert sum(len(task.eval_source(n, num_examples=10**6, seed=0)) for n in range(23, 49)) == 3920
    few = task.eval_source(48, num_examples=5, seed=1)
    assert (
        len(few) == 5
        and few[0]["input"].tolist()
        == task.eval_source(48, num_examples=5, seed=1)[0]["input"].tolist()
    )
    for rec in few:
        check(
            "scan",
            rec["input"] - NUM_SPECIAL,
            rec["output"] - NUM_SPECIAL,
            rec["output_mask"],
            task,
        )
    for layout in ("decoder", "seq2seq"):
        b = task.eval_batch(few, layout)
        assert b["inputs"].shape[0] == 5
    s2s = task.eval_batch(few, "seq2seq")
    assert s2s["src_mask"].sum(1).max() <= 9 and s2s["loss_mask"].sum(1).tolist() == [48] * 5


def test_scan_encoder_layout_is_refused():
    from experiments.tasks.layouts import check_layout

    with pytest.raises(ConfigError, match="does not fit task 'scan'"):
        check_layout(build("scan"), "encoder")
    assert BLANK == 3  # the encoder layout's answer slot, which SCAN does not use
