"""Prompt -> answer algorithmic tasks of Kazemnejad et al. 2023, plus associative recall.

Kazemnejad et al., "The Impact of Positional Encoding on Length Generalization in
Transformers" (arXiv 2305.19466): decoder-only, prompt + separator + answer, loss and
exact-match accuracy on the answer, train on lengths up to L = 20 and test up to 2L. Their
tasks are given in words; the concrete token formats below are ours and fixed-width so that
one nominal length gives one batch shape:
  copy, reverse, sort   n digits -> the digits copied / reversed / sorted ascending;
  addition              a + b with n-digit operands (most significant first, leading zeros
                        allowed) -> the sum as n + 1 digits (leading zero kept);
  summation             n digits -> their sum mod 10;
  parity                n bits -> number of 1s mod 2;
  polynomial            x ':' c_0 ... c_{n-1} -> sum_i c_i x^i mod 10.
Associative recall (Ba et al. 2016; Zoology, Arora et al. 2023): n key-value pairs with
distinct keys, a query marker, then num_queries keys present in the prompt -> their values.

Symbols: digits are 0..9; operators and keys follow. Metric: exact match of the answer
("seq_acc"); chance is given only for one-token answers.
"""

import numpy as np

from attn.registry import ConfigError
from experiments.tasks.base import Task, full_mask

DIGITS = 10
PLUS = 10
COLON = 10


class AlgorithmicTask(Task):
    FAMILY = "algorithmic"
    METRIC = "seq_acc"
    ALPHABET = OUTPUT_ALPHABET = DIGITS
    DEFAULTS = {
        **Task.DEFAULTS,
        "max_length": 20,
        "eval_lengths": (5, 10, 15, 20, 25, 30, 35, 40),
    }

    @property
    def chance(self):
        return None


class SingleTokenTask(AlgorithmicTask):
    @property
    def chance(self):
        return 1.0 / self.OUTPUT_ALPHABET


class Copy(AlgorithmicTask):
    """n digits -> the same n digits."""

    NAME = "copy"

    def output_length(self, n):
        return n

    def sample(self, rng, n, batch):
        s = rng.integers(0, DIGITS, size=(batch, n), dtype=np.int32)
        return s, s.copy(), full_mask(batch, n)


class Reverse(AlgorithmicTask):
    """n digits -> the digits reversed."""

    NAME = "reverse"

    def output_length(self, n):
        return n

    def sample(self, rng, n, batch):
        s = rng.integers(0, DIGITS, size=(batch, n), dtype=np.int32)
        return s, s[:, ::-1].copy(), full_mask(batch, n)


class Sort(AlgorithmicTask):
    """n digits -> sorted ascending."""

    NAME = "sort"

    def output_length(self, n):
        return n

    def sample(self, rng, n, batch):
        s = rng.integers(0, DIGITS, size=(batch, n), dtype=np.int32)
        return s, np.sort(s, 1), full_mask(batch, n)


class Addition(AlgorithmicTask):
    """a + b, n decimal digits each (most significant first) -> a + b as n + 1 digits."""

    NAME = "addition"
    ALPHABET = DIGITS + 1

    def input_length(self, n):
        return 2 * n + 1

    def output_length(self, n):
        return n + 1

    def sample(self, rng, n, batch):
        a = rng.integers(0, DIGITS, size=(batch, n), dtype=np.int32)
        b = rng.integers(0, DIGITS, size=(batch, n), dtype=np.int32)
        x = np.concatenate([a, np.full((batch, 1), PLUS, np.int32), b], 1)
        y = np.zeros((batch, n + 1), np.int32)
        carry = np.zeros(batch, np.int32)
        for i in range(n - 1, -1, -1):
            t = a[:, i] + b[:, i] + carry
            y[:, i + 1], carry = t % DIGITS, t // DIGITS
        y[:, 0] = carry
        return x, y, full_mask(batch, n + 1)


class Summation(SingleTokenTask):
    """n digits -> their sum mod 10."""

    NAME = "summation"

    def sample(self, rng, n, batch):
        s = rng.integers(0, DIGITS, size=(batch, n), dtype=np.int32)
        return s, (s.sum(1) % DIGITS)[:, None], full_mask(batch, 1)


class Parity(SingleTokenTask):
    """n bits (digits 0/1) -> number of 1s mod 2."""

    NAME = "parity"
    ALPHABET = OUTPUT_ALPHABET = 2

    def sample(self, rng, n, batch):
        s = rng.integers(0, 2, size=(batch, n), dtype=np.int32)
        return s, (s.sum(1) % 2)[:, None], full_mask(batch, 1)


class Polynomial(SingleTokenTask):
    """x ':' c_0 .. c_{n-1} -> (sum_i c_i x^i) mod 10 (Kazemnejad's polynomial evaluation)."""

    NAME = "polynomial"
    ALPHABET = DIGITS + 1

    def input_length(self, n):
        return n + 2

    def sample(self, rng, n, batch):
        xv = rng.integers(0, DIGITS, size=(batch, 1), dtype=np.int32)
        c = rng.integers(0, DIGITS, size=(batch, n), dtype=np.int32)
        powers = np.ones((batch, n), np.int64)
        for i in range(1, n):
            powers[:, i] = powers[:, i - 1] * xv[:, 0] % DIGITS
        y = (c * powers).sum(1) % DIGITS
        x = np.concatenate([xv, np.full((batch, 1), COLON, np.int32), c], 1)
        return x, y[:, None].astype(np.int32), full_mask(batch, 1)


class AssociativeRecall(AlgorithmicTask):
    """k_1 v_1 .. k_n v_n '?' q_1 .. q_Q -> the values of the queried keys.

    Keys are distinct within a prompt (so n <= num_keys) and drawn from num_keys symbols
    after the 10 value digits; queries are distinct keys of the prompt when n >= num_queries,
    otherwise drawn with repetition. Nominal length n = number of pairs.
    """

    NAME = "associative_recall"
    DEFAULTS = {**AlgorithmicTask.DEFAULTS, "num_keys": 128, "num_queries": 4}

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.num_keys = int(self.cfg["num_keys"])
        self.num_queries = int(self.cfg["num_queries"])
        if self.num_queries < 1 or self.num_keys < 1:
            raise ConfigError("task.num_keys/num_queries: must be >= 1")
        longest = max(self.max_train_length, *map(int, self.cfg["eval_lengths"]))
        if longest > self.num_keys:
            raise ConfigError(
                f"task.num_keys: {self.num_keys} < {longest} pairs (max_length/eval_lengths);"
                " keys in a prompt are distinct"
            )

    @property
    def alphabet_size(self):
        return DIGITS + self.num_keys + 1

    @property
    def query_marker(self):
        return DIGITS + self.num_keys

    def input_length(self, n):
        return 2 * n + 1 + self.num_queries

    def output_length(self, n):
        return self.num_queries

    def sample(self, rng, n, batch):
        if n > self.num_keys:
            raise ConfigError(f"task.num_keys: {self.num_keys} < {n} pairs; keys are distinct")
        keys = np.argsort(rng.random((batch, self.num_keys)), 1)[:, :n]
        values = rng.integers(0, DIGITS, size=(batch, n), dtype=np.int32)
        if n >= self.num_queries:
            which = np.argsort(rng.random((batch, n)), 1)[:, : self.num_queries]
        else:
            which = rng.integers(0, n, size=(batch, self.num_queries))
        queries = np.take_along_axis(keys, which, 1) + DIGITS
        x = np.empty((batch, 2 * n), np.int32)
        x[:, ::2], x[:, 1::2] = keys + DIGITS, values
        marker = np.full((batch, 1), self.query_marker, np.int32)
        x = np.concatenate([x, marker, queries.astype(np.int32)], 1)
        y = np.take_along_axis(values, which, 1)
        return x, y, full_mask(batch, self.num_queries)


TASKS = (Copy, Reverse, Addition, Sort, Summation, Parity, Polynomial, AssociativeRecall)
