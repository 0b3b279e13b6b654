"""Retrieval over long contexts: passkey and multi-key needles in a haystack, and the
flip-flop language.

- `passkey` (Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context
  Length for Transformers", arXiv 2305.16300): a key of `value_digits` digits hidden at a
  uniformly random depth in filler, asked for at the end. Their filler is one repeated
  sentence; ours is random symbols of a filler alphabet, so no part of the haystack can be
  predicted (a harder and shorter-to-state haystack).
- `needle` (multi-key needle in a haystack, RULER: Hsieh et al. 2024, "RULER: What's the Real
  Context Size of Your Long-Context Language Models?", arXiv 2404.06654): `num_needles`
  needles, each a key symbol (distinct within a prompt) followed by its value digits, at
  random depths; the query names `num_queries` of the keys; the answer is their values in
  query order.
  Layout of both: filler with the needles inserted, then QUERY and the queried keys; nominal
  length n = the number of filler symbols, so the input has n + needles x (1 + value_digits)
  + 1 + num_queries symbols. Trained up to max_length, evaluated at 4-16x it.
- `flip_flop` (Liu et al. 2023, "Exposing Attention Glitches with Flip-Flop Language
  Modeling", arXiv 2306.00946): n + 1 instruction-bit pairs; instructions are write, ignore,
  read with probabilities ((1 - p)/2, p, (1 - p)/2), p = `p_ignore` (their FFL(0.8)); the
  first is a write, the last a read; a written or ignored bit is uniform, a read's bit is the
  last written one. Trained as a language model on every next token (`loss="all"`, as Liu et
  al.; "reads" scores only the read bits), evaluated on the read bits only (token_acc: the
  fraction of reads right, seq_acc: sequences without a glitch). `eval_p_ignore` draws the
  evaluation sets from another FFL(p) (their sparse 0.98 and dense 0.1 tests).
"""

import numpy as np

from attn.registry import require
from experiments.tasks import layouts
from experiments.tasks.base import NUM_SPECIAL, Task

DIGITS = 10


class Needle(Task):
    """RULER's multi-key needle in a haystack (module docstring)."""

    NAME = "needle"
    FAMILY = "retrieval"
    METRIC = "seq_acc"
    LAYOUTS = ("decoder", "encoder")
    DEFAULTS = {
        **Task.DEFAULTS,
        "max_length": 64,
        "eval_lengths": (16, 32, 64, 128, 256, 512, 1024),
        "num_needles": 4,
        "num_queries": 1,
        "num_keys": 16,
        "value_digits": 3,
        "num_filler": 16,
    }

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        for key in ("num_needles", "num_queries", "num_keys", "value_digits", "num_filler"):
            require(int(c[key]) >= 1, f"task.{key}", f"must be >= 1, got {c[key]!r}")
        require(
            c["num_needles"] <= c["num_keys"],
            "task.num_keys",
            f"{c['num_keys']} keys cannot name {c['num_needles']} distinct needles",
        )
        require(
            c["num_queries"] <= c["num_needles"],
            "task.num_queries",
            f"{c['num_queries']} queries of {c['num_needles']} needles; each asks a different one",
        )
        self.keys = DIGITS  # first key symbol
        self.filler = DIGITS + int(c["num_keys"])
        self.query = self.filler + int(c["num_filler"])
        self.ALPHABET = self.query + 1
        self.OUTPUT_ALPHABET = DIGITS

    @property
    def chance(self):
        return None

    def input_length(self, n):
        c = self.cfg
        return n + c["num_needles"] * (1 + c["value_digits"]) + 1 + c["num_queries"]

    def output_length(self, n):
        return self.cfg["num_queries"] * self.cfg["value_digits"]

    def sample(self, rng, n, batch):
        c = self.cfg
        k, q, d = c["num_needles"], c["num_queries"], c["value_digits"]
        keys = np.argsort(rng.random((batch, c["num_keys"])), axis=1)[:, :k]
        values = rng.integers(0, DIGITS, size=(batch, k, d), dtype=np.int32)
        filler = rng.integers(0, c["num_filler"], size=(batch, n), dtype=np.int32) + self.filler
        depth = np.sort(rng.integers(0, n + 1, size=(batch, k)), axis=1)
        asked = np.argsort(rng.random((batch, k)), axis=1)[:, :q]
        x = np.empty((batch, self.input_length(n)), np.int32)
        for b in range(batch):
            needles = np.concatenate([keys[b, :, None] + self.keys, values[b]], axis=1)
            pieces, last = [], 0
            for j in range(k):
                pieces += [filler[b, last : depth[b, j]], needles[j]]
                last = depth[b, j]
            pieces += [filler[b, last:], [self.query], keys[b, asked[b]] + self.keys]
            x[b] = np.concatenate(pieces)
        y = np.take_along_axis(values, asked[:, :, None], axis=1).reshape(batch, q * d)
        return x, y, np.ones_like(y, bool)


class Passkey(Needle):
    """Mohtashami & Jaggi 2023's passkey retrieval: one needle, one key (module docstring).
    Example (value_digits 3, filler symbols f): `f f K 4 0 7 f ? K` -> `4 0 7`."""

    NAME = "passkey"
    DEFAULTS = {**Needle.DEFAULTS, "num_needles": 1, "num_keys": 1, "value_digits": 5}


class FlipFlop(Task):
    """Liu et al. 2023's flip-flop language (module docstring).

    Symbols: bits 0 and 1, then write, read, ignore. Example: `w 1 i 0 r 1 w 0 r 0` (reads
    return the last write: 1, then 0).
    """

    NAME = "flip_flop"
    FAMILY = "retrieval"
    METRIC = "token_acc"
    LAYOUTS = ("decoder",)
    ALPHABET = 5
    OUTPUT_ALPHABET = 2
    WRITE, READ, IGNORE = 2, 3, 4
    LOSSES = ("all", "reads")
    DEFAULTS = {
        **Task.DEFAULTS,
        "train_lengths": "fixed",
        "max_length": 64,
        "eval_lengths": (16, 32, 64, 128, 256, 512, 1024),
        "p_ignore": 0.8,
        "eval_p_ignore": -1.0,  # < 0: the training p_ignore
        "loss": "all",
    }

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        for key in ("p_ignore", "eval_p_ignore"):
            p = float(c[key])
            require(
                0.0 <= p < 1.0 or (key == "eval_p_ignore" and p < 0),
                f"task.{key}",
                f"a probability in [0, 1), got {p}",
            )
        require(
            c["loss"] in self.LOSSES,
            "task.loss",
            f"unknown {c['loss']!r}; allowed: {', '.join(self.LOSSES)}",
        )

    def input_length(self, n):
        return 2 * (n + 1)

    def output_length(self, n):
        return n + 1

    def sequence_length(self, n, layout):
        del layout
        return 2 * (n + 1) - 1  # a language model reads all but the last token

    def _draw(self, rng, n, batch, p_ignore):
        u = rng.random((batch, n + 1))
        p_write = (1.0 - p_ignore) / 2
        op = np.where(u < p_write, self.WRITE, np.where(u < 1.0 - p_write, self.IGNORE, self.READ))
        op[:, 0] = self.WRITE
        op[:, -1] = self.READ
        bits = rng.integers(0, 2, size=(batch, n + 1), dtype=np.int32)
        reads = op == self.READ
        # the bit of the latest write at or before each instruction
        last = np.maximum.accumulate(np.where(op == self.WRITE, np.arange(n + 1), 0), axis=1)
        bits = np.where(reads, np.take_along_axis(bits, last, axis=1), bits)
        x = np.empty((batch, 2 * (n + 1)), np.int32)
        x[:, 0::2], x[:, 1::2] = op, bits
        return x, np.where(reads, bits, 0), reads

    def sample(self, rng, n, batch):
        return self._draw(rng, n, batch, float(self.cfg["p_ignore"]))

    def example(self, seed, index, length):
        p = float(self.cfg["eval_p_ignore"])
        x, y, m = self._draw(
            self._example_rng(seed, index, length),
            length,
            1,
            p if p >= 0 else float(self.cfg["p_ignore"]),
        )
        return {"input": x[0] + NUM_SPECIAL, "output": y[0] + NUM_SPECIAL, "output_mask": m[0]}

    def _lay_out(self, x_BN, reads_BM, every_token: bool):
        batch = layouts.format_lm(x_BN + NUM_SPECIAL)
        if not every_token:
            loss = np.zeros_like(batch["loss_mask"])
            loss[:, 0 : x_BN.shape[1] - 1 : 2] = reads_BM  # target 2k is instruction k's bit
            batch["loss_mask"] = loss
        return batch

    def train_batch(self, rng, n, batch_size, layout):
        layouts.check_layout(self, layout)
        x, _, m = self.batch(rng, n, batch_size)
        return self._lay_out(x, m, self.cfg["loss"] == "all")

    def eval_batch(self, records, layout):
        layouts.check_layout(self, layout)
        x = np.stack([r["input"] for r in records]) - NUM_SPECIAL
        return self._lay_out(x, np.stack([r["output_mask"] for r in records]), False)

    def token_label(self, token_id):
        return {0: "0", 1: "1", 2: "w", 3: "r", 4: "i"}.get(token_id - NUM_SPECIAL, ".")


TASKS = (Passkey, Needle, FlipFlop)
