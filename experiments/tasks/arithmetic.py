"""Arithmetic with operands of independent lengths, and sorting of multi-digit numbers: the
tasks of the 2024 arithmetic length-generalization papers, with their formats as options.

- `long_addition`, `long_multiplication`: a + b, a * b with decimal operands whose lengths
  are drawn independently (McLeish et al. 2024, "Transformers Can Do Arithmetic with the
  Right Embeddings", arXiv 2405.17399 (Abacus); Cho et al. 2024, "Position Coupling:
  Improving Length Generalization of Arithmetic Transformers Using Task Structure", arXiv
  2405.20671; Zhou et al. 2024, "Transformers Can Achieve Length Generalization But Not
  Robustly", arXiv 2402.09371). Not the `addition` of experiments/tasks/algorithmic.py
  (Kazemnejad et al.: equal lengths, most significant digit first, fixed width).
- `number_sort`: a list of numbers -> the list sorted ascending (the Abacus paper's
  sorting task: up to `digits` digits per number and `numbers` numbers).

Each example lives on a grid of two lengths (GRID_AXES): the digits of a and of b, or the
largest number of digits and the count of numbers. A number of d > 1 digits has a non-zero
leading digit (both reference codes). Nominal length n means, in training, both lengths
drawn independently from U{min_length..n} per example (the Abacus and coupling data: every
pair of lengths up to 20 or 30); for evaluation, the cell (n, n), "n-digit addition" as all
three papers report it. `grid_lengths` lists each axis of the 2-D evaluation
(experiments/grid.py), which scores exact match per cell.

Formats (task fields), each a paper's choice:
  reverse_operands  operands written least significant digit first (Abacus: "reverse all");
  reverse_answer    the answer written least significant digit first (all three papers);
  pad               operands zero-padded to the longer one, the answer to the full width of
                    the padded operands (w + 1 digits for a sum, 2w for a product, w the
                    longer length; position coupling);
  index_hints       a hint symbol before every digit naming its significance, shared by the
                    digits of equal significance in both operands and the answer (Zhou et
                    al. 2024, after Zhou et al. 2023); `num_hints` symbols; with
                    `random_hints` training draws where the hints start, so every hint symbol
                    is trained (the index-hint baseline of the position-coupling reference
                    code); evaluation starts at the first;
  positions         position ids the task hands the model (README "Interfaces"):
                    "abacus"  each digit's place inside its own number, 1 for the first
                              written digit (the least significant one when reversed), 0 for
                              every other token; an offset sampler adds Abacus' random k;
                    "coupled" digits of significance s in both operands and the answer share
                              id 1 + s, the operator and the separator ('=') take 1 (Cho et
                              al.: '+' and '=' at the start id, digit s at start + s); an
                              offset sampler bounded by the table draws the random start;
                              for products this is our extension (the follow-up paper, arXiv
                              2410.15787, couples multiplication differently).
Symbols: digits 0-9, then the hints, then the operator (or the comma), then `fill` (padding of
the fixed-width task-symbol arrays, never shown to a model).
"""

import numpy as np

from attn.registry import ConfigError, require
from experiments.tasks.base import NUM_SPECIAL, RaggedTask, Task

DIGITS = 10
POSITION_FORMATS = ("none", "abacus", "coupled")
GRID_STREAM = 4


def number(rng: np.random.Generator, length: int) -> list[int]:
    """Digits (most significant first) of a uniform number of exactly `length` digits."""
    first = int(rng.integers(1 if length > 1 else 0, DIGITS))
    return [first, *rng.integers(0, DIGITS, size=length - 1).tolist()]


def digits_of(value: int, width: int = 0) -> list[int]:
    """Decimal digits of value, most significant first, zero-padded to width."""
    return [int(c) for c in str(value).zfill(width)]


def value_of(digits) -> int:
    return int("".join(map(str, digits))) if len(digits) else 0


def abacus_ids(tokens, is_digit) -> list[int]:
    """1, 2, ... along every run of digits (in written order), 0 elsewhere."""
    out, run = [], 0
    for t in tokens:
        run = run + 1 if is_digit(t) else 0
        out.append(run)
    return out


class GridTask(RaggedTask):
    """Rows described by a cell (two lengths); see the module docstring."""

    FAMILY = "arithmetic"
    METRIC = "seq_acc"
    LAYOUTS = ("decoder",)
    GRID_AXES = ("", "")
    DEFAULTS = {
        **Task.DEFAULTS,
        "train_lengths": "fixed",
        "max_length": 20,
        "eval_lengths": (5, 10, 20, 30, 40, 60, 80, 100),
        "grid_lengths": (1, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100),
        "positions": "none",
    }

    def __init__(self, cfg=None):
        super().__init__(cfg)
        require(
            self.cfg["positions"] in POSITION_FORMATS,
            "task.positions",
            f"unknown {self.cfg['positions']!r}; allowed: {', '.join(POSITION_FORMATS)}",
        )
        grid = self.cfg["grid_lengths"]
        require(
            len(grid) > 0 and all(int(v) >= 1 for v in grid),
            "task.grid_lengths",
            f"lengths >= 1 for each grid axis, got {grid!r}",
        )

    @property
    def chance(self):
        return None

    def longest(self) -> int:
        """The longest length any configured training, evaluation or grid cell asks for."""
        return max(
            self.max_train_length, *map(int, self.cfg["eval_lengths"]), *self.cfg["grid_lengths"]
        )

    def cell_row(self, rng, cell, *, train: bool):
        """(input, output) symbol lists of one example of `cell`."""
        raise NotImplementedError

    def cell_rows(self, rng, cells, *, train: bool):
        return [self.cell_row(rng, (int(i), int(j)), train=train) for i, j in cells]

    def _pad(self, rows, width_in: int, width_out: int):
        b = len(rows)
        x = np.full((b, width_in), self.fill, np.int32)
        y = np.zeros((b, width_out), np.int32)
        m = np.zeros((b, width_out), bool)
        for r, (xi, yi) in enumerate(rows):
            if len(xi) > width_in or len(yi) > width_out:
                raise AssertionError((self.NAME, len(xi), width_in, len(yi), width_out))
            x[r, : len(xi)] = xi
            y[r, : len(yi)] = yi
            m[r, : len(yi)] = True
        return x, y, m

    def sample(self, rng, n, batch):
        lo = min(int(self.cfg["min_length"]), n)
        cells = rng.integers(lo, n + 1, size=(batch, 2))
        rows = self.cell_rows(rng, cells, train=True)
        return self._pad(rows, self.input_length(n), self.output_length(n))

    def grid_examples(self, seed: int, indices, cell) -> dict:
        """Evaluation examples of one grid cell, deterministic in (seed, index, cell); ids
        shifted by NUM_SPECIAL like `example`."""
        i, j = map(int, cell)
        rows = [
            self.cell_row(
                np.random.default_rng([seed, k, i, j, self.id, GRID_STREAM]), (i, j), train=False
            )
            for k in indices
        ]
        n = max(i, j)
        x, y, m = self._pad(rows, self.input_length(n), self.output_length(n))
        return {"input": x + NUM_SPECIAL, "output": y + NUM_SPECIAL, "output_mask": m}

    def example(self, seed, index, length):
        """The evaluation example at nominal `length`: the grid cell (length, length)."""
        one = self.grid_examples(seed, [index], (length, length))
        return {k: v[0] for k, v in one.items()}


class OperandTask(GridTask):
    """a OP b with operands of independent lengths (module docstring)."""

    GRID_AXES = ("digits of a", "digits of b")
    OP_NAME = ""
    DEFAULTS = {
        **GridTask.DEFAULTS,
        "reverse_operands": False,
        "reverse_answer": True,
        "pad": False,
        "index_hints": False,
        "num_hints": 128,
        "random_hints": True,
    }

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        self.hints = int(c["num_hints"]) if c["index_hints"] else 0
        require(
            not (c["index_hints"] and c["positions"] != "none"),
            "task.positions",
            f"{c['positions']!r} with index_hints: the hints already mark each digit's place; "
            "use one of them",
        )
        if c["index_hints"]:
            need = self.answer_width(self.longest(), self.longest())
            require(
                self.hints >= need,
                "task.num_hints",
                f"{self.hints} hint symbols cannot mark the {need} places of the longest "
                f"answer (lengths up to {self.longest()}); raise num_hints",
            )
        self.op = DIGITS + self.hints
        self.ALPHABET = DIGITS + self.hints + 2  # digits, hints, operator, fill
        self.OUTPUT_ALPHABET = DIGITS + self.hints

    def compute(self, a: int, b: int) -> int:
        raise NotImplementedError

    def answer_width(self, la: int, lb: int) -> int:
        """Digits of the longest answer (and of every padded answer)."""
        raise NotImplementedError

    def input_length(self, n):
        per_digit = 2 if self.hints else 1
        return 2 * n * per_digit + 1

    def output_length(self, n):
        return self.answer_width(n, n) * (2 if self.hints else 1)

    def _write(self, digits: list[int], reverse: bool, start: int) -> list[int]:
        """Digits (most significant first) in written order, with hints if on."""
        if reverse:
            digits = digits[::-1]
        if not self.hints:
            return list(digits)
        sig = range(1, len(digits) + 1) if reverse else range(len(digits), 0, -1)
        out = []
        for s, d in zip(sig, digits, strict=True):
            h = start + s - 1
            if h >= self.hints:
                raise ConfigError(
                    f"task.num_hints: {self.hints} hint symbols cannot mark place {s}; "
                    "raise num_hints"
                )
            out += [DIGITS + h, d]
        return out

    def cell_row(self, rng, cell, *, train):
        la, lb = cell
        a, b = number(rng, la), number(rng, lb)
        c = self.cfg
        answer = self.compute(value_of(a), value_of(b))
        if c["pad"]:
            width = max(la, lb)
            a, b = [0] * (width - la) + a, [0] * (width - lb) + b
            y = digits_of(answer, self.answer_width(width, width))
        else:
            y = digits_of(answer)
        start = 0
        if self.hints and train and c["random_hints"]:
            places = max(len(a), len(b), len(y))
            start = int(rng.integers(0, self.hints - places + 1))
        x = self._write(a, c["reverse_operands"], start)
        x += [self.op] + self._write(b, c["reverse_operands"], start)
        return x, self._write(y, c["reverse_answer"], start)

    def row_positions(self, x, y):
        kind = self.cfg["positions"]
        if kind == "none":
            return None
        x, y = [int(t) for t in x], [int(t) for t in y]
        is_digit = lambda t: t < DIGITS
        if kind == "abacus":
            return abacus_ids(x, is_digit), 0, abacus_ids(y, is_digit)
        k = x.index(self.op)

        def coupled(tokens, reverse):
            n = len(tokens)
            return [1 + (i + 1 if reverse else n - i) for i in range(n)]

        rev_in, rev_out = self.cfg["reverse_operands"], self.cfg["reverse_answer"]
        ids = coupled(x[:k], rev_in) + [1] + coupled(x[k + 1 :], rev_in)
        return ids, 1, coupled(y, rev_out)

    def token_label(self, token_id):
        t = token_id - NUM_SPECIAL
        if t == self.op:
            return self.OP_NAME
        if DIGITS <= t < DIGITS + self.hints:
            return f"h{t - DIGITS}"
        return str(t) if 0 <= t < DIGITS else "."


class LongAddition(OperandTask):
    """a + b, operands of independent lengths (module docstring).

    Example (reverse_answer, the default): 97 + 5 = 102 is `9 7 + 5` -> `2 0 1`; with pad and
    reverse_operands: `7 9 + 5 0` -> `2 0 1`.
    """

    NAME = "long_addition"
    OP_NAME = "+"

    def compute(self, a, b):
        return a + b

    def answer_width(self, la, lb):
        return max(la, lb) + 1


class LongMultiplication(OperandTask):
    """a * b, operands of independent lengths (module docstring); the Abacus paper trains
    on operands of up to 15 digits. Example: 12 * 34 = 408 is `1 2 * 3 4` -> `8 0 4`."""

    NAME = "long_multiplication"
    OP_NAME = "*"
    DEFAULTS = {
        **OperandTask.DEFAULTS,
        "max_length": 15,
        "eval_lengths": (5, 10, 15, 20, 25),
        "grid_lengths": (1, 3, 5, 8, 10, 13, 15, 18, 20, 25),
    }

    def compute(self, a, b):
        return a * b

    def answer_width(self, la, lb):
        return la + lb


class NumberSort(GridTask):
    """Numbers separated by commas -> the same numbers sorted ascending, same format.

    Cell (d, c): c numbers, each of a length drawn from U{1..d} (the Abacus paper's sorting
    data, "uniform distribution, max digits n, max length m"). `reverse_operands` writes every
    number least significant digit first (their reversed format). Example: `3 1 , 2 , 1 0` ->
    `2 , 1 0 , 3 1`.
    """

    NAME = "number_sort"
    GRID_AXES = ("max digits", "numbers")
    DEFAULTS = {
        **GridTask.DEFAULTS,
        "max_length": 10,
        "eval_lengths": (5, 10, 15, 20, 30),
        "grid_lengths": (1, 3, 5, 8, 10, 13, 15, 20, 25, 30),
        "reverse_operands": True,
    }
    ALPHABET = DIGITS + 2  # digits, comma, fill
    OUTPUT_ALPHABET = DIGITS + 1
    COMMA = DIGITS

    def __init__(self, cfg=None):
        super().__init__(cfg)
        require(
            self.cfg["positions"] != "coupled",
            "task.positions",
            "'coupled' is defined for operands of equal significance; number_sort takes "
            "'none' or 'abacus'",
        )

    def input_length(self, n):
        return n * n + n - 1

    def output_length(self, n):
        return self.input_length(n)

    def _write(self, numbers):
        out = []
        for k, digits in enumerate(numbers):
            out += ([self.COMMA] if k else []) + (
                digits[::-1] if self.cfg["reverse_operands"] else digits
            )
        return out

    def cell_row(self, rng, cell, *, train):
        del train
        d, c = cell
        numbers = [number(rng, int(rng.integers(1, d + 1))) for _ in range(c)]
        ordered = sorted(numbers, key=value_of)
        return self._write(numbers), self._write(ordered)

    def row_positions(self, x, y):
        if self.cfg["positions"] == "none":
            return None
        is_digit = lambda t: t < DIGITS
        return (
            abacus_ids([int(t) for t in x], is_digit),
            0,
            abacus_ids([int(t) for t in y], is_digit),
        )

    def token_label(self, token_id):
        t = token_id - NUM_SPECIAL
        return "," if t == self.COMMA else (str(t) if 0 <= t < DIGITS else ".")


TASKS = (LongAddition, LongMultiplication, NumberSort)
