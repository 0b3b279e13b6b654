"""TFDS builders (ArrayRecord, no TensorFlow) for fixed evaluation sets and text corpora.

- `AttnTaskEval`: one dataset per (task, its data fields, length, num_examples, seed): examples
  `task.example(seed, i, length)` for i < num_examples, split "test". The evaluation protocol
  of Deletang et al. 2023 / Kazemnejad et al. 2023 scores fixed sets per test length.
- `AttnText`: whole text files of a directory (default: this Python's standard library, the
  *.py files under sysconfig.get_paths()["stdlib"] minus site-packages), byte tokens, split
  train / validation / test by a stable hash of the relative path (90 / 5 / 5), documents
  kept whole so that evaluation can use long contexts (Press et al. 2022 evaluate on
  non-overlapping chunks). The dataset metadata records files and bytes per split, the
  source directory and the Python version.

A text split is also flattened once into `stream-<split>.u8` (all documents' bytes, uint8)
and `stream-<split>.eos.npy` (where the end-of-document tokens go) beside the dataset
(`text_stream_files`), which the text task memory-maps: every process of a run, and every
run on the machine, shares one copy in the page cache instead of decoding the corpus to
int32 in its own memory.

Both write `file_format="array_record"` and are read with `builder.as_data_source(split)`,
which TFDS 4.9 supports without TensorFlow (tensorflow_datasets' "TF-less" data sources:
example serialisation and parsing fall back to its own protobuf code). Builder configs are
made on the fly (`config=` an instance not in BUILDER_CONFIGS; TFDS's warning about that is
filtered out) and cached under data_dir/<builder>/<config>/<version>.
"""

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import sys
import sysconfig

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from attn.registry import ConfigError


class _QuietCustomConfig(logging.Filter):
    """Drops TFDS's warning for configs made on the fly: every builder here is made that way."""

    def filter(self, record):
        return "Using custom data configuration" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietCustomConfig())

log = logging.getLogger("attn.data")

DEFAULT_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "data" / "tfds"
TEXT_SPLITS = (("train", 90), ("validation", 5), ("test", 5))


def resolve_data_dir(data_dir=None) -> str:
    """data_dir, else $ATTN_DATA_DIR, else <repo>/data/tfds."""
    return str(data_dir or os.environ.get("ATTN_DATA_DIR") or DEFAULT_DATA_DIR)


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """Builder defined in this file, with no registered checksums or downloads.

    TFDS 4.9.10 finds a builder's code path through `importlib_resources`, a package it does
    not declare as a dependency (missing from our environment); giving the path directly
    skips that lookup.
    """

    BUILDER_CONFIGS = []

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
    # prepared" to stdout; nothing is downloaded here, so one log line says what is built.
    def _log_download_bytes(self) -> None:
        log.info("building %s locally in %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        pass


# ---------------------------------------------------------------------- task evaluation sets


@dataclasses.dataclass
class TaskEvalConfig(tfds.core.BuilderConfig):
    task_cfg: str = "{}"  # JSON of the task block, name included
    length: int = 0
    num_examples: int = 0
    seed: int = 0


class AttnTaskEval(_LocalBuilder):
    """Fixed evaluation examples of one task at one nominal length."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Examples task.example(seed, i, length), i < num_examples."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "index": tfds.features.Scalar(np.int64),
                    "input": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "output": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "output_mask": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        cfg = self.builder_config
        task = self.task  # set by task_eval_builder: the task object, not rebuilt from JSON
        for start in range(0, cfg.num_examples, 256):
            idx = range(start, min(start + 256, cfg.num_examples))
            chunk = task.examples(cfg.seed, idx, cfg.length)
            for j, i in enumerate(idx):
                yield i, {"index": i, **{k: v[j] for k, v in chunk.items()}}


def prepare(builder):
    """download_and_prepare, tolerating another process that finished the same build first.

    TFDS writes into a private incomplete.* directory and renames it into place, so two
    processes building one dataset race only on that rename; the loser finds it prepared.
    """
    tfds.disable_progress_bar()
    try:
        builder.download_and_prepare()
    except OSError:
        if not type(builder)(
            config=builder.builder_config, data_dir=builder.data_dir_root
        ).is_prepared():
            raise
    return builder


def task_eval_builder(task, *, length: int, num_examples: int, seed: int, data_dir=None):
    # Named by the fields that shape examples only: runs that differ in training lengths
    # share one evaluation set.
    key = json.dumps({"name": task.name, **task.data_fields()}, sort_keys=True, default=list)
    name = f"{task.name}-{_short_hash(key)}-n{length}-k{num_examples}-s{seed}"
    config = TaskEvalConfig(
        name=name,
        description=f"{task.name} at length {length}: {key}",
        task_cfg=json.dumps({"name": task.name, **task.cfg}, sort_keys=True, default=list),
        length=length,
        num_examples=num_examples,
        seed=seed,
    )
    builder = AttnTaskEval(
        config=config, data_dir=resolve_data_dir(data_dir), file_format="array_record"
    )
    builder.task = task
    return builder


def task_eval_source(task, *, length: int, num_examples: int, seed: int, data_dir=None):
    """The fixed set as a random-access data source (built on first use)."""
    builder = task_eval_builder(
        task, length=length, num_examples=num_examples, seed=seed, data_dir=data_dir
    )
    return prepare(builder).as_data_source(split="test")


# ------------------------------------------------------------------------------ text corpora


@dataclasses.dataclass
class TextConfig(tfds.core.BuilderConfig):
    source: str = ""  # directory of text files
    pattern: str = "*.py"


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def text_split(relpath: str) -> str:
    """train / validation / test from a stable hash of the relative path."""
    bucket = int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) % 100
    for split, share in TEXT_SPLITS:
        if bucket < share:
            return split
        bucket -= share
    raise AssertionError("split shares must sum to 100")


def text_files(source: str, pattern: str) -> list[tuple[str, pathlib.Path]]:
    """Sorted (relative path, path) of matching files, skipping installed packages."""
    root = pathlib.Path(source)
    out = []
    for path in sorted(root.rglob(pattern)):
        rel = path.relative_to(root)
        if {"site-packages", "dist-packages", "__pycache__"} & set(rel.parts):
            continue
        if path.is_file():
            out.append((rel.as_posix(), path))
    return out


class AttnText(_LocalBuilder):
    """Whole text files as byte sequences, split by a stable hash of the relative path."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Byte-level documents; 90/5/5 split by sha1(relative path)."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "path": tfds.features.Text(),
                    "bytes": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        files = text_files(cfg.source, cfg.pattern)
        if not files:
            raise ConfigError(f"task.pattern: no {cfg.pattern!r} files under {cfg.source}")
        by_split = {split: [] for split, _ in TEXT_SPLITS}
        for rel, path in files:
            by_split[text_split(rel)].append((rel, path))
        meta = self.info.metadata
        meta["source"] = cfg.source
        meta["pattern"] = cfg.pattern
        meta["python_version"] = sys.version.split()[0]
        meta["files"] = {s: len(v) for s, v in by_split.items()}
        meta["bytes"] = {s: sum(p.stat().st_size for _, p in v) for s, v in by_split.items()}
        return {s: self._generate_examples(v) for s, v in by_split.items()}

    def _generate_examples(self, files):
        for rel, path in files:
            yield rel, {"path": rel, "bytes": np.frombuffer(path.read_bytes(), np.uint8)}


def text_builder(source: str | None = None, *, pattern: str = "*.py", data_dir=None):
    """Builder over `source` (default: the standard library of the running Python)."""
    if source in (None, "", "stdlib"):
        source = stdlib_dir()
        name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"
    else:
        source = str(pathlib.Path(source).expanduser().resolve())
        if not pathlib.Path(source).is_dir():
            raise ConfigError(f"task.source: {source} is not a directory; 'stdlib' or a directory")
        name = f"dir-{_short_hash(source + '|' + pattern)}"
    config = TextConfig(
        name=name, description=f"{pattern} under {source}", source=source, pattern=pattern
    )
    return AttnText(config=config, data_dir=resolve_data_dir(data_dir), file_format="array_record")


def text_stream_files(builder, split: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(bytes path, eos path) of a prepared text split, written on first use.

    The bytes file holds the split's documents back to back (uint8); the .npy holds, for
    each document, the stream index of the EOS token that follows it (int64, ascending), so
    the token stream is bytes + NUM_SPECIAL with those EOS tokens in between. Each file is
    written to a private tmp name and renamed, so processes that build it at once race
    harmlessly.
    """
    root = pathlib.Path(str(builder.data_dir))
    data, eos = root / f"stream-{split}.u8", root / f"stream-{split}.eos.npy"
    if data.exists() and eos.exists():
        return data, eos
    source = builder.as_data_source(split=split)
    lengths = np.zeros(len(source), np.int64)
    tmp = data.with_name(f".{data.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for i in range(len(source)):
            doc = np.asarray(source[i]["bytes"], np.uint8)
            f.write(doc.tobytes())
            lengths[i] = len(doc)
    os.replace(tmp, data)
    tmp = eos.with_name(f".{eos.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, np.cumsum(lengths) + np.arange(len(lengths)))
    os.replace(tmp, eos)
    return data, eos
