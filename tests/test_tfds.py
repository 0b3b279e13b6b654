"""TFDS ArrayRecord datasets (task eval sets, text corpora) build and read without TensorFlow."""

import importlib.util
import itertools
import sys
import sysconfig

import numpy as np
import pytest

from attn.registry import ConfigError
from experiments import input_pipeline as ip
from experiments import tasks
from experiments.tasks import EOS, NUM_SPECIAL, tfds_builders


@pytest.fixture(autouse=True)
def never_imports_tensorflow():
    yield
    assert "tensorflow" not in sys.modules


def test_environment_has_no_tensorflow():
    # The project's environment has no TensorFlow (pyproject.toml); everything below runs
    # in it, and the fixture checks that nothing imported TensorFlow along the way.
    assert importlib.util.find_spec("tensorflow") is None


def test_task_eval_set_builds_and_reads_back(tmp_path, capsys):
    task = tasks.build({"name": "binary_addition"})
    batches = list(
        ip.eval_batches(
            task, layout="encoder", length=9, batch_size=4, num_examples=10, data_dir=tmp_path
        )
    )
    assert [b["inputs"].shape[0] for b in batches] == [4, 4, 2]
    assert capsys.readouterr().out == ""  # no "Downloading and preparing dataset ..." lines
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    for i in range(10):
        ex = task.example(ip.EVAL_SEED, i, 9)
        np.testing.assert_array_equal(rows["inputs"][i, :9], ex["input"])
        np.testing.assert_array_equal(rows["targets"][i, 9:19], ex["output"])
        np.testing.assert_array_equal(rows["loss_mask"][i, 9:19], ex["output_mask"])
    builder = tfds_builders.task_eval_builder(
        task, length=9, num_examples=10, seed=ip.EVAL_SEED, data_dir=tmp_path
    )
    assert builder.is_prepared() and str(builder.version) == "1.0.0"
    assert list(tmp_path.glob("attn_task_eval/*/1.0.0/*.array_record-*"))
    source = builder.as_data_source(split="test")
    assert len(source) == 10 and [int(source[i]["index"]) for i in range(10)] == list(range(10))


def test_task_eval_set_is_cached_and_keyed_by_fields(tmp_path, monkeypatch):
    cfg = {"batch_size": 8, "num_examples": 8}
    task = tasks.build({"name": "parity_check"})
    first = list(ip.eval_batches(task, layout="decoder", length=5, data_dir=tmp_path, **cfg))

    def fail(self):
        raise AssertionError("rebuilt a prepared dataset")

    monkeypatch.setattr(tfds_builders.AttnTaskEval, "_generate_examples", fail)
    again = list(ip.eval_batches(task, layout="decoder", length=5, data_dir=tmp_path, **cfg))
    np.testing.assert_array_equal(first[0]["inputs"], again[0]["inputs"])
    monkeypatch.undo()
    shorter = tasks.build({"name": "parity_check", "max_length": 20})  # same examples
    list(ip.eval_batches(shorter, layout="decoder", length=5, data_dir=tmp_path, **cfg))
    assert len(list(tmp_path.glob("attn_task_eval/*"))) == 1
    for queries in (4, 2):
        recall = tasks.build({"name": "associative_recall", "num_queries": queries})
        list(ip.eval_batches(recall, layout="decoder", length=5, data_dir=tmp_path, **cfg))
    assert len(list(tmp_path.glob("attn_task_eval/*"))) == 3


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    texts = {}
    for i in range(40):
        rel = f"pkg{i % 3}/mod_{i}.py" if i % 2 else f"top_{i}.py"
        texts[rel] = f"# file {i}\nprint({i} * {i})\n" * (1 + i % 5)
    texts["site-packages/skipped.py"] = "skip me\n"
    texts["notes.txt"] = "not python\n"
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    del texts["site-packages/skipped.py"], texts["notes.txt"]
    return root, texts


def test_text_dataset_splits_and_metadata(tmp_path, corpus):
    root, texts = corpus
    builder = tfds_builders.prepare(tfds_builders.text_builder(str(root), data_dir=tmp_path))
    seen = {}
    for split in ("train", "validation", "test"):
        source = builder.as_data_source(split=split)
        for i in range(len(source)):
            rec = source[i]
            path = rec["path"].decode() if isinstance(rec["path"], bytes) else rec["path"]
            assert path not in seen, f"{path} in {seen.get(path)} and {split}"
            seen[path] = split
            assert rec["bytes"].tobytes().decode() == texts[path]
            assert tfds_builders.text_split(path) == split
    assert set(seen) == set(texts)
    meta = builder.info.metadata
    assert meta["python_version"] == sys.version.split()[0]
    assert sum(meta["files"].values()) == len(texts)
    assert sum(meta["bytes"].values()) == sum(len(t) for t in texts.values())
    reread = tfds_builders.text_builder(str(root), data_dir=tmp_path)
    assert reread.is_prepared() and reread.info.metadata["files"] == meta["files"]


def test_text_batches(tmp_path, corpus):
    root, texts = corpus
    task = tasks.build(
        {
            "name": "text",
            "source": str(root),
            "data_dir": str(tmp_path),
            "min_length": 16,
            "max_length": 16,
        }
    )
    assert task.vocab_size == NUM_SPECIAL + 256 and task.layouts == ("decoder",)
    train = task.stream("train")[:]  # the whole stream, materialised (it is memory-mapped)
    assert (train == EOS).sum() == sum(tfds_builders.text_split(p) == "train" for p in texts)
    assert train.min() >= 0 and train.max() < task.vocab_size
    stream = ip.train_batches(task, batch_size=4, layout="decoder", seed=0)
    (_, b0), (_, b1) = itertools.islice(stream, 2)
    again = next(ip.train_batches(task, batch_size=4, layout="decoder", seed=0, start_step=1))[1]
    np.testing.assert_array_equal(b1["inputs"], again["inputs"])
    assert b0["inputs"].shape == (4, 16) and b0["loss_mask"].all()
    np.testing.assert_array_equal(b0["inputs"][:, 1:], b0["targets"][:, :-1])
    joined = train.tobytes()
    for row in np.concatenate([b0["inputs"], b0["targets"][:, -1:]], 1):
        assert row.astype(np.int32).tobytes() in joined  # a contiguous window
    evals = list(
        ip.eval_batches(
            task, layout="decoder", length=16, batch_size=3, num_examples=1000, data_dir=tmp_path
        )
    )
    stream = task.stream("validation", str(tmp_path))
    chunks = np.concatenate([b["inputs"] for b in evals])
    assert len(chunks) >= 2
    assert len(chunks) == (len(stream) - 1) // 16
    np.testing.assert_array_equal(chunks.reshape(-1), stream[: chunks.size])  # no overlap


def test_text_source_errors(tmp_path):
    with pytest.raises(ConfigError, match="task.source"):
        tfds_builders.text_builder(str(tmp_path / "missing"), data_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="task.pattern"):
        tfds_builders.prepare(
            tfds_builders.text_builder(str(tmp_path / "empty"), data_dir=tmp_path)
        )


def test_stdlib_config_names_the_python_version():
    builder = tfds_builders.text_builder(data_dir="/nonexistent")
    assert builder.builder_config.source == sysconfig.get_paths()["stdlib"]
    major, minor = sys.version_info[:2]
    assert builder.builder_config.name == f"stdlib-py{major}.{minor}"


@pytest.mark.slow
def test_stdlib_corpus_builds(tmp_path):
    builder = tfds_builders.prepare(tfds_builders.text_builder(data_dir=tmp_path))
    meta = builder.info.metadata
    assert meta["files"]["train"] > 1000 and meta["bytes"]["validation"] > 100_000
