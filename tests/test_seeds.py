"""Tests for experiments/seeds.py: S seeds trained under jax.vmap equal S separate runs.

A tiny encoder whose seeds draw different training lengths, so their batches are padded
together. Dropout is off: a dropout mask (like a randomized-position draw) is sampled over the
padded shape, so with dropout the vmapped seeds match separate runs in distribution, not draw
for draw (seeds.py says so).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import formal
from experiments import mesh, optim, seeds, train

SEEDS = (0, 1)


def tiny_config():
    config = formal.get_config("smoke=true,pe=alibi,task=reverse_string")
    config.task.max_length = 12  # two length buckets (16, 24): few shapes to compile
    config.model.dropout = 0.0
    config.train.optimizer.lr = 1e-2  # large steps, so a wrong update could not hide
    config.train.steps = 3
    config.train.ckpt_every = 2
    config.eval.lengths = "24"
    config.eval.compilation_cache = ""
    return config


def _rows(workdir, split):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_stack_batches_pads_every_key_to_the_longest():
    a = {"inputs": np.ones((2, 16), np.int32), "token_mask": np.ones((2, 16), bool)}
    b = {"inputs": np.ones((2, 24), np.int32), "token_mask": np.ones((2, 24), bool)}
    out = seeds.stack_batches([a, b])
    assert out["inputs"].shape == (2, 2, 24) and out["token_mask"].dtype == bool
    assert out["inputs"][0, :, 16:].sum() == 0 and not out["token_mask"][0, :, 16:].any()
    assert out["inputs"][1].sum() == 2 * 24


def test_vmapped_steps_equal_separate_steps():
    """The core claim, without files: the driver's step under vmap == the step per seed."""
    config = tiny_config()
    configs = [seeds.seed_config(config, s) for s in SEEDS]
    tx = optim.make_optimizer(config)
    graphdef, states = seeds.init_states(configs, mesh.make_mesh(config), tx)
    streams = [train.host_batches(c, seed=c.seed, start=0) for c in configs]
    batches = [[next(s) for _ in range(config.train.steps)] for s in streams]
    widths = [[b["inputs"].shape[1] for b in seed_batches] for seed_batches in batches]
    assert widths[0] != widths[1], "the seeds should need padding together"

    stacked = seeds.stack(states)
    vmapped = seeds.make_vmapped_step(config, graphdef, tx)
    together = []
    for step in range(config.train.steps):
        batch = seeds.stack_batches([seed_batches[step] for seed_batches in batches])
        stacked, metrics = vmapped(stacked, {k: jnp.asarray(v) for k, v in batch.items()})
        together.append(np.asarray(metrics["loss"]))
    single = train.make_train_step(config, graphdef, tx, donate=False)
    for i, state in enumerate(states):
        losses = []
        for batch in batches[i]:
            state, metrics = single(state, {k: jnp.asarray(v) for k, v in batch.items()})
            losses.append(float(metrics["loss"]))
        np.testing.assert_allclose([v[i] for v in together], losses, rtol=1e-5, atol=1e-6)
        for a, b in zip(
            jax.tree.leaves(seeds.unstack(stacked, i)["params"]),
            jax.tree.leaves(state["params"]),
            strict=True,
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_vmapped_seeds_write_the_same_runs_as_the_driver(tmp_path):
    """End to end: seeds.run's workdirs == train.run's (results, metrics rows, checkpoints)."""
    config = tiny_config()
    together = [tmp_path / f"vmap/seed={s}" for s in SEEDS]
    results = seeds.run(config, [str(w) for w in together], list(SEEDS))
    for seed, wd, result in zip(SEEDS, together, results, strict=True):
        alone = tmp_path / f"alone/seed={seed}"
        expected = train.run(seeds.seed_config(config, seed), str(alone))
        assert result["seed"] == seed and (wd / "DONE").exists()
        on_disk = json.loads((wd / "results.json").read_text())
        assert on_disk["variant"] == expected["variant"] and on_disk["step"] == expected["step"]
        for n, metrics in expected["per_length"].items():
            for key in ("loss", "token_acc", "seq_acc"):
                assert on_disk["per_length"][str(n)][key] == pytest.approx(
                    metrics[key], rel=1e-4, abs=1e-5
                ), (seed, n, key)
        got, want = _rows(wd, "train"), _rows(alone, "train")
        assert [r["step"] for r in got] == [r["step"] for r in want]
        np.testing.assert_allclose(
            [r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-4, atol=1e-5
        )
        assert set(want[0]) - {"compile_s"} <= set(got[0])
        assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == sorted(
            p.name for p in (alone / "checkpoints").iterdir()
        )
    assert results[0]["per_length"] != results[1]["per_length"]


def test_resume_at_the_final_checkpoint_logs_the_final_evaluation_once(tmp_path):
    """A vmapped run killed after its final checkpoint, during the final evaluation (no DONE),
    re-evaluates on resume; its metrics.jsonl must then hold each final eval row once."""
    config = tiny_config()
    workdirs = [tmp_path / f"seed={s}" for s in SEEDS]
    seeds.run(config, [str(w) for w in workdirs], list(SEEDS))
    for wd in workdirs:
        (wd / "DONE").unlink()  # as if killed before DONE was written
    seeds.run(config, [str(w) for w in workdirs], list(SEEDS))
    for wd in workdirs:
        keys = [(r["step"], r["length"]) for r in _rows(wd, "eval")]
        assert len(keys) == len(set(keys)), keys
        assert [r["step"] for r in _rows(wd, "train")] == list(range(1, config.train.steps + 1))
