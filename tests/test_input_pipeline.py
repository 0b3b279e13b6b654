"""Batch layouts, length buckets, determinism by (seed, step), resume and process sharding."""

import itertools

import numpy as np
import pytest

from attn.registry import ConfigError
from experiments import input_pipeline as ip
from experiments import tasks
from experiments.tasks import BLANK, BOS, EOS, NUM_SPECIAL, SEP, layouts

KEYS = {"inputs", "targets", "loss_mask", "token_mask"}


def build(name, **kw):
    return tasks.build({"name": name, **kw})


def take(it, k):
    return list(itertools.islice(it, k))


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bucket_length():
    buckets = {layouts.bucket_length(n) for n in range(1, 122)}
    assert buckets == {16, 24, 32, 48, 64, 96, 128}
    prev = 0
    for n in range(1, 5000):
        t = layouts.bucket_length(n)
        assert t >= n and t % 8 == 0 and t >= prev and t < 1.5 * n + 16
        prev = t
    assert layouts.bucket_length(16384) == 16384 and layouts.bucket_length(513) == 768


def test_bucket_cut_at_the_longest_training_length():
    assert [layouts.bucket_length(n, 41) for n in (10, 30, 33, 41, 42, 50)] == [
        16,
        32,
        41,
        41,
        48,
        64,
    ]
    assert layouts.bucket_length(32, 32) == 32 and layouts.bucket_length(16, 12) == 16


@pytest.mark.parametrize(
    "name, layout, cap",
    [
        ("parity_check", "encoder", 41),
        ("reverse_string", "decoder", 81),
        ("addition", "decoder", None),
    ],
)
def test_training_batches_pad_no_further_than_the_longest_training_length(name, layout, cap):
    """parity_check n = 1..40 reads n + 1 tokens in the encoder layout: its top bucket is 41,
    not 48; `padded_length(train=True)` says each training batch's T; evaluation batches keep
    their plain buckets (an eval set at n = 40 is 48 long)."""
    task = build(name, min_length=1, max_length=40)
    assert cap is None or task.train_cap(layout) == cap
    cap = task.train_cap(layout)
    for n in range(1, 41):
        b = task.train_batch(np.random.default_rng(n), n, 4, layout)
        t = b["inputs"].shape[1]
        real = int(b["token_mask"].sum(1).max())
        assert t >= real and t == layouts.bucket_length(real, cap), (n, t, real)
        if not isinstance(task, tasks.base.RaggedTask):
            assert t == layouts.padded_length(task, layout, n, train=True)
        assert t <= max(cap, layouts.bucket_length(real))
    x, y, m = task.batch(np.random.default_rng(0), 40, 2)
    ev = layouts.format_batch(x + NUM_SPECIAL, y + NUM_SPECIAL, m, layout)
    assert ev["inputs"].shape[1] == layouts.padded_length(task, layout, 40)


def _one(task, n, layout, batch=3, seed=0):
    x, y, m = task.batch(np.random.default_rng(seed), n, batch)
    return (
        x + NUM_SPECIAL,
        y + NUM_SPECIAL,
        m,
        layouts.format_batch(x + NUM_SPECIAL, y + NUM_SPECIAL, m, layout),
    )


def _check_common(b, real):
    t = b["inputs"].shape[1]
    assert t == layouts.bucket_length(real)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32 and b["token_mask"].dtype == bool
    assert b["token_mask"][:, :real].all() and not b["token_mask"][:, real:].any()
    pad = ~b["token_mask"]
    assert (b["inputs"][pad] == 0).all() and (b["targets"][pad] == 0).all()
    assert (b["loss_mask"][pad] == 0).all()


@pytest.mark.parametrize("n", [1, 7, 40])
def test_encoder_layout(n):
    task = build("binary_addition")  # output mask is not all-true
    x, y, m, b = _one(task, n, "encoder")
    nx, ny = x.shape[1], y.shape[1]
    assert set(b) == KEYS
    _check_common(b, nx + ny)
    np.testing.assert_array_equal(b["inputs"][:, :nx], x)
    assert (b["inputs"][:, nx : nx + ny] == BLANK).all()
    np.testing.assert_array_equal(b["targets"][:, nx : nx + ny], y)
    np.testing.assert_array_equal(b["loss_mask"][:, nx : nx + ny], m.astype(np.float32))
    assert (b["loss_mask"][:, :nx] == 0).all()


@pytest.mark.parametrize("n", [1, 9, 40])
def test_decoder_layout(n):
    task = build("stack_manipulation")
    x, y, m, b = _one(task, n, "decoder")
    nx, ny = x.shape[1], y.shape[1]
    _check_common(b, nx + ny + 1)
    seq = np.concatenate([x, np.full((3, 1), SEP), y, np.full((3, 1), EOS)], 1)
    np.testing.assert_array_equal(b["inputs"][:, : nx + ny + 1], seq[:, :-1])
    np.testing.assert_array_equal(b["targets"][:, : nx + ny + 1], seq[:, 1:])
    want = np.zeros((3, nx + ny + 1), np.float32)
    want[:, nx : nx + ny] = m
    want[:, nx + ny] = 1.0  # EOS is scored
    np.testing.assert_array_equal(b["loss_mask"][:, : nx + ny + 1], want)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_seq2seq_layout(n):
    task = build("reverse")
    x, y, m, b = _one(task, n, "seq2seq")
    nx, ny = x.shape[1], y.shape[1]
    assert set(b) == KEYS | {"src", "src_mask"}
    _check_common(b, ny)
    assert b["src"].shape[1] == layouts.bucket_length(nx)
    np.testing.assert_array_equal(b["src"][:, :nx], x)
    assert b["src_mask"][:, :nx].all() and not b["src_mask"][:, nx:].any()
    assert (b["src"][~b["src_mask"]] == 0).all()
    assert (b["inputs"][:, 0] == BOS).all()
    np.testing.assert_array_equal(b["inputs"][:, 1:ny], y[:, :-1])
    np.testing.assert_array_equal(b["targets"][:, :ny], y)
    np.testing.assert_array_equal(b["loss_mask"][:, :ny], m.astype(np.float32))


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_train_batches_deterministic_and_resumable(layout):
    task = build("modular_arithmetic")
    a = take(ip.train_batches(task, batch_size=8, layout=layout, seed=3), 6)
    b = take(ip.train_batches(task, batch_size=8, layout=layout, seed=3), 6)
    resumed = take(ip.train_batches(task, batch_size=8, layout=layout, seed=3, start_step=4), 2)
    assert [s for s, _ in a] == list(range(6)) and [s for s, _ in resumed] == [4, 5]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert_batches_equal(x, y)
    for (_, x), (_, y) in zip(a[4:], resumed, strict=True):
        assert_batches_equal(x, y)
    other = take(ip.train_batches(task, batch_size=8, layout=layout, seed=4), 6)
    assert any(
        x[k].shape != y[k].shape or not np.array_equal(x[k], y[k])
        for (_, x), (_, y) in zip(a, other, strict=True)
        for k in x
    )


def test_one_nominal_length_per_batch():
    task = build("parity_check")
    for step, b in take(ip.train_batches(task, batch_size=8, layout="encoder", seed=0), 20):
        n = task.train_length(0, step)
        assert (b["token_mask"].sum(1) == n + 1).all()


def test_process_sharding_reassembles_global_batch():
    task = build("binary_addition")
    full = take(ip.train_batches(task, batch_size=8, layout="decoder", seed=1, start_step=2), 3)
    shards = [
        take(
            ip.train_batches(
                task,
                batch_size=8,
                layout="decoder",
                seed=1,
                start_step=2,
                process_index=p,
                process_count=4,
            ),
            3,
        )
        for p in range(4)
    ]
    for i, (step, batch) in enumerate(full):
        assert all(s[i][0] == step for s in shards)
        for k in batch:
            assert shards[0][i][1][k].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate([s[i][1][k] for s in shards]), batch[k])
    with pytest.raises(ConfigError, match="batch_size"):
        next(ip.train_batches(task, batch_size=8, layout="decoder", seed=1, process_count=3))


def test_few_shapes_over_a_deletang_run():
    task = build("duplicate_string")  # longest outputs: T up to 3 * 40
    shapes = {
        b["inputs"].shape
        for _, b in take(ip.train_batches(task, batch_size=8, layout="encoder", seed=0), 300)
    }
    assert len(shapes) <= 7


def test_layout_errors():
    with pytest.raises(ConfigError, match="layout"):
        next(ip.train_batches(build("copy"), batch_size=8, layout="lm", seed=0))
    with pytest.raises(ConfigError, match="layout"):
        next(ip.train_batches(build("text"), batch_size=8, layout="encoder", seed=0))
