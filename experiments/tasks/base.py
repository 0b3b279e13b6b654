"""Task base class and training-length distributions.

A task maps a nominal length n to batches of (input, output, output_mask) in *task-symbol
space* (0..alphabet_size-1), and carries everything else that depends on what it is, so no
module outside experiments/tasks asks a task for its kind:
- batches: `train_batch` (shifted by NUM_SPECIAL and laid out by experiments.tasks.layouts),
  `sequence_length` (real tokens in a layout), `eval_source` / `eval_batch` (the fixed
  evaluation set, a TFDS dataset built locally);
- metrics: `extra_metrics` (what an evaluation reports beyond loss and accuracies);
- text: `encode` / `decode` / `decoder_prompt` / `render` for generation, `token_label` for
  attention-map axes.

Determinism: `example(seed, index, length)` draws from
`np.random.default_rng([seed, index, length, task_id, EXAMPLE_STREAM])`, so the same
(seed, index, length) always gives the same example, whatever else is generated around it.
Training batches are drawn as a whole (vectorised) from a generator seeded by (seed, step),
see input_pipeline; `sample` is the one generator both paths share.

Length distributions (Deletang et al. 2023 train on n ~ U{1..40}, one n per batch):
  "fixed"       n = max_length (min_length ignored);
  "uniform"     n ~ U{min_length..max_length};
  "curriculum"  n ~ U{min_length..m(step)}, m growing linearly from min_length to max_length
                over curriculum_steps steps (then flat).
"""

import zlib

import numpy as np

from attn.registry import ConfigError, merge_defaults
from experiments.tasks import layouts
from experiments.tasks.layouts import BLANK, BOS, EOS, NUM_SPECIAL, PAD, SEP  # noqa: F401

EXAMPLE_STREAM = 1
BATCH_STREAM = 2
LENGTH_STREAM = 3

LENGTH_KINDS = ("fixed", "uniform", "curriculum")
# Config fields that choose lengths, not what an example of a given length looks like.
LENGTH_FIELDS = (
    "train_lengths",
    "min_length",
    "max_length",
    "curriculum_steps",
    "eval_lengths",
    "grid_lengths",
)


def task_id(name: str) -> int:
    """Stable 32-bit id of a task name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode())


class Task:
    """Base class. Subclasses set NAME, FAMILY, ALPHABET, OUTPUT_ALPHABET, METRIC, LAYOUTS.

    Subclasses implement `input_length(n)`, `output_length(n)` and either `draw` + `solve` or
    `sample(rng, n, batch) -> (input_BN, output_BM, mask_BM)` in task-symbol space, with
    fixed shapes for a given n (so batches need no per-row padding).
    """

    NAME = ""
    FAMILY = ""
    ALPHABET = 2  # input symbols, as published; outputs share ids 0..OUTPUT_ALPHABET-1
    OUTPUT_ALPHABET = 2
    METRIC = "token_acc"
    LAYOUTS = ("encoder", "decoder", "seq2seq")
    DEFAULTS: dict = {
        "train_lengths": "uniform",
        "min_length": 1,
        "max_length": 40,
        "curriculum_steps": 0,
        "eval_lengths": (41, 50, 60, 80, 100, 150, 200, 300, 400, 500),
    }

    def __init__(self, cfg: dict | None = None):
        self.cfg = merge_defaults(self.DEFAULTS, {**dict(cfg or {}), "name": self.NAME}, "task")
        self.id = task_id(self.NAME)
        self._validate_lengths()

    def _validate_lengths(self) -> None:
        kind = self.cfg["train_lengths"]
        if kind not in LENGTH_KINDS:
            raise ConfigError(
                f"task.train_lengths: unknown kind {kind!r}; allowed: {', '.join(LENGTH_KINDS)}"
            )
        lo, hi = int(self.cfg["min_length"]), int(self.cfg["max_length"])
        if kind == "fixed":
            lo = min(lo, hi)  # min_length plays no part
        if not 1 <= lo <= hi:
            raise ConfigError(
                f"task.min_length/max_length: need 1 <= min_length <= max_length; got {lo}, {hi}"
            )
        if kind == "curriculum" and int(self.cfg["curriculum_steps"]) <= 0:
            raise ConfigError("task.curriculum_steps: must be > 0 for train_lengths='curriculum'")

    def data_fields(self) -> dict:
        """The config fields that determine `example` (evaluation sets are keyed by them)."""
        return {k: v for k, v in self.cfg.items() if k not in LENGTH_FIELDS}

    @property
    def name(self) -> str:
        return self.NAME

    @property
    def family(self) -> str:
        return self.FAMILY

    @property
    def metric(self) -> str:
        return self.METRIC

    @property
    def layouts(self) -> tuple[str, ...]:
        return self.LAYOUTS

    @property
    def alphabet_size(self) -> int:
        return max(self.ALPHABET, self.OUTPUT_ALPHABET)

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + self.alphabet_size

    @property
    def chance(self) -> float | None:
        """Token accuracy of uniform guessing over the output alphabet."""
        return 1.0 / self.OUTPUT_ALPHABET

    @property
    def max_train_length(self) -> int:
        return int(self.cfg["max_length"])

    def train_length(self, seed: int, step: int) -> int:
        """Nominal length of the batch at `step`; a pure function of (seed, step)."""
        kind = self.cfg["train_lengths"]
        lo, hi = int(self.cfg["min_length"]), int(self.cfg["max_length"])
        if kind == "fixed":
            return hi
        if kind == "curriculum":
            frac = min(1.0, step / int(self.cfg["curriculum_steps"]))
            hi = lo + int(round(frac * (hi - lo)))
        rng = np.random.default_rng([seed, step, self.id, LENGTH_STREAM])
        return int(rng.integers(lo, hi + 1))

    def input_length(self, n: int) -> int:
        return n

    def output_length(self, n: int) -> int:
        return 1

    def draw(self, rng: np.random.Generator, n: int, batch: int) -> np.ndarray:
        """Random inputs (batch, input_length(n)) for tasks that define `solve`."""
        raise NotImplementedError

    def solve(self, x_BN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(output, output_mask) of task-symbol inputs, for tasks whose answer is a function
        of the input alone; worked examples and checkers call it directly."""
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, n: int, batch: int):
        x = self.draw(rng, n, batch)
        return (x, *self.solve(x))

    def batch(self, rng: np.random.Generator, n: int, batch: int):
        """Checked `sample`: int32 arrays of the declared shapes."""
        if n < 1:
            raise ValueError(f"length must be >= 1, got {n}")
        x, y, m = self.sample(rng, n, batch)
        x = np.asarray(x, np.int32)
        y = np.asarray(y, np.int32)
        m = np.asarray(m, bool)
        assert x.shape == (batch, self.input_length(n)), (self.NAME, x.shape)
        assert y.shape == m.shape == (batch, self.output_length(n)), (self.NAME, y.shape)
        return x, y, m

    # -- batches

    def sequence_length(self, n: int, layout: str) -> int:
        """Real tokens of an example of nominal length n in `layout` (before bucketing)."""
        x, y = self.input_length(n), self.output_length(n)
        if layout == "decoder":
            return x + y + 1  # separator; EOS is a target only
        if layout == "seq2seq":
            return max(x, y)
        return x + y

    def train_cap(self, layout: str) -> int | None:
        """The longest real length of a training example in `layout`: training batches are
        padded to no more than this (layouts.bucket_length); None for seq2seq."""
        return None if layout == "seq2seq" else self.sequence_length(self.max_train_length, layout)

    def train_batch(self, rng: np.random.Generator, n: int, batch_size: int, layout: str):
        """A training batch of nominal length n, laid out for the model."""
        x, y, m = self.batch(rng, n, batch_size)
        cap = self.train_cap(layout)
        return layouts.format_batch(x + NUM_SPECIAL, y + NUM_SPECIAL, m, layout, cap)

    def eval_source(self, length: int, *, num_examples: int, seed: int, data_dir=None):
        """Random-access records of the fixed evaluation set at `length` (TFDS, built on
        first use: experiments/tasks/tfds_builders.py)."""
        from experiments.tasks import tfds_builders  # TFDS takes ~1 s to import

        return tfds_builders.task_eval_source(
            self, length=length, num_examples=num_examples, seed=seed, data_dir=data_dir
        )

    def eval_batch(self, records: list[dict], layout: str) -> dict:
        """Records of `eval_source` -> one batch laid out for the model."""
        b = {k: np.stack([r[k] for r in records]) for k in records[0]}
        return layouts.format_batch(b["input"], b["output"], b["output_mask"], layout)

    def extra_metrics(self, metrics: dict) -> dict:
        """Metrics beyond loss / token_acc / seq_acc that an evaluation reports."""
        del metrics
        return {}

    # -- text

    def encode(self, text: str) -> list[int]:
        """A prompt typed by a person: whitespace-separated symbol indices."""
        try:
            symbols = [int(s) for s in text.split()]
        except ValueError:
            symbols = None
        top = self.alphabet_size - 1
        if not symbols or not all(0 <= s <= top for s in symbols):
            raise ConfigError(
                f"--prompt: {text!r}; task {self.NAME!r} takes symbol indices 0..{top} "
                "separated by spaces, e.g. '0 1 1'"
            )
        return [s + NUM_SPECIAL for s in symbols]

    def decode(self, ids) -> str:
        """Token ids up to the first EOS as text (symbol indices; <n> for special ids)."""
        ids = [int(i) for i in ids]
        if EOS in ids:
            ids = ids[: ids.index(EOS)]
        return " ".join(str(i - NUM_SPECIAL) if i >= NUM_SPECIAL else f"<{i}>" for i in ids)

    def decoder_prompt(self, ids: list[int]) -> list[int]:
        """What a decoder is fed before it answers: the input and the separator."""
        return ids + [SEP]

    def render(self, prompt: str, completion: str) -> str:
        return f"{prompt} -> {completion}"

    def token_label(self, token_id: int) -> str:
        return str(token_id - NUM_SPECIAL)

    def _example_rng(self, seed: int, index: int, length: int) -> np.random.Generator:
        return np.random.default_rng([seed, index, length, self.id, EXAMPLE_STREAM])

    def example(self, seed: int, index: int, length: int) -> dict:
        """One example, deterministic in (seed, index, length); ids are task ids + NUM_SPECIAL."""
        x, y, m = self.batch(self._example_rng(seed, index, length), length, 1)
        return {"input": x[0] + NUM_SPECIAL, "output": y[0] + NUM_SPECIAL, "output_mask": m[0]}

    def examples(self, seed: int, indices, length: int) -> dict:
        """`example` for many indices, stacked; the same values, solved in one vectorised call
        where the task has a solver (building long evaluation sets)."""
        if type(self).draw is Task.draw:
            rows = [self.example(seed, i, length) for i in indices]
            return {k: np.stack([r[k] for r in rows]) for k in ("input", "output", "output_mask")}
        x = np.concatenate(
            [self.draw(self._example_rng(seed, i, length), length, 1) for i in indices]
        )
        y, m = self.solve(x)
        return {
            "input": x.astype(np.int32) + NUM_SPECIAL,
            "output": np.asarray(y, np.int32) + NUM_SPECIAL,
            "output_mask": np.asarray(m, bool),
        }


class RaggedTask(Task):
    """A task whose rows differ in length inside one batch (operands of independent lengths,
    SCAN commands), and which may give the model position ids of its own.

    In task-symbol space `sample` still returns fixed shapes: inputs padded on the right with
    `fill` (the last input symbol, which a model never sees) and outputs with 0 under a False
    mask, so the shared checks and evaluation sets hold as for every task. The batches strip
    that padding (`rows`) and lay the rows out with `layouts.format_rows`: every row is right
    padded to the batch's bucket and every real output token is scored.

    Position ids (README "Interfaces", attn/positions.py): `row_positions(x, y)` returns the
    ids of the input tokens, of the separator and of the output tokens of one row, or None
    for no positions (the default); ids are >= 0, 0 meaning "no position", and smaller than
    the padded length. They reach the model as the batch's "positions".
    """

    @property
    def fill(self) -> int:
        return self.alphabet_size - 1

    def rows(self, x_BN, y_BM, m_BM) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input, output) of each row, padding stripped (outputs: the masked-in prefix)."""
        out = []
        for x, y, m in zip(x_BN, y_BM, m_BM, strict=True):
            real = np.flatnonzero(np.asarray(x) != self.fill)
            out.append(
                (np.asarray(x[: real[-1] + 1 if len(real) else 0]), np.asarray(y[: int(np.sum(m))]))
            )
        return out

    def row_positions(self, x: np.ndarray, y: np.ndarray):
        """(input ids, separator id, output ids) of one row, or None (no task positions)."""
        del x, y
        return None

    def lay_out(self, rows, layout: str, cap: int | None = None) -> dict[str, np.ndarray]:
        """Rows of task symbols -> one batch in `layout` (with the task's positions)."""
        positions = [self.row_positions(x, y) for x, y in rows]
        if any(p is None for p in positions):
            positions = None
        return layouts.format_rows(
            [x + NUM_SPECIAL for x, _ in rows],
            [y + NUM_SPECIAL for _, y in rows],
            layout,
            positions=positions,
            cap=cap,
        )

    def train_batch(self, rng, n, batch_size, layout):
        rows = self.rows(*self.batch(rng, n, batch_size))
        return self.lay_out(rows, layout, self.train_cap(layout))

    def eval_batch(self, records, layout):
        rows = self.rows(
            [np.asarray(r["input"]) - NUM_SPECIAL for r in records],
            [np.asarray(r["output"]) - NUM_SPECIAL for r in records],
            [np.asarray(r["output_mask"]) for r in records],
        )
        return self.lay_out(rows, layout)


def full_mask(batch: int, m: int) -> np.ndarray:
    return np.ones((batch, m), bool)


def mask_through_terminator(out_BM: np.ndarray, terminator: int) -> np.ndarray:
    """True up to and including the first terminator (Deletang's accuracy_mask)."""
    is_term = out_BM == terminator
    first = np.where(is_term.any(1), is_term.argmax(1), out_BM.shape[1] - 1)
    return np.arange(out_BM.shape[1])[None, :] <= first[:, None]


def random_bits(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(0, 2, size=shape, dtype=np.int32)


class Uniforms:
    """Pre-drawn uniforms consumed one at a time: cheap scalar draws for recursive samplers."""

    def __init__(self, rng: np.random.Generator, size: int):
        self._rng = rng
        self._size = max(16, size)
        self._buf = rng.random(self._size)
        self._i = 0

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in [low, high)."""
        if self._i == self._size:
            self._buf = self._rng.random(self._size)
            self._i = 0
        u = self._buf[self._i]
        self._i += 1
        return low + int(u * (high - low))
