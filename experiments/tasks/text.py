"""Byte-level language modelling on real text (Press et al. 2022 evaluation protocol).

Press, Smith and Lewis, "Train Short, Test Long" (arXiv 2108.12409): train on windows of L
tokens, evaluate perplexity on non-overlapping chunks of longer lengths. The corpus is the
TFDS dataset `attn_text` (tfds_builders.AttnText): by default this Python's standard library
sources, or any directory of text files (`source` field). Tokens are bytes 0..255 shifted by
NUM_SPECIAL; documents of a split are concatenated with EOS between them, so windows and
chunks may cross document boundaries (as in WikiText-103 LM practice). The stream is a
`TokenStream` over a memory-mapped uint8 file (tfds_builders.text_stream_files): processes
share the page cache and only the windows a batch needs become int32.

Training windows of length L + 1 start at offsets drawn uniformly from the train stream by
the batch generator of (seed, step). Evaluation chunk i covers tokens [iL, (i+1)L] of the
eval split's stream (L inputs, L targets).
"""

import math
import os

import numpy as np

from experiments.tasks import layouts
from experiments.tasks.base import EOS, NUM_SPECIAL, Task

BYTES = 256


class TokenStream:
    """The token stream of a text split, read from memory-mapped bytes.

    Token t is EOS where t is in `eos` (the stream index after each document), else the byte
    at t minus the number of EOS tokens before t, plus NUM_SPECIAL. Indexing with an int, a
    slice or an integer array returns int32 tokens; nothing else is materialised.
    """

    def __init__(self, data_path, eos_path):
        size = os.path.getsize(data_path)
        self._bytes = np.memmap(data_path, np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self._eos = np.load(eos_path)
        self._eos_or_end = np.append(self._eos, -1)  # indexable by searchsorted's answer

    def __len__(self) -> int:
        return len(self._bytes) + len(self._eos)

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        t = np.asarray(index, np.int64)
        if t.size and (t.min() < 0 or t.max() >= len(self)):
            raise IndexError(f"token index out of range [0, {len(self)})")
        before = np.searchsorted(self._eos, t)  # EOS tokens before t
        is_eos = self._eos_or_end[before] == t
        if not len(self._bytes):
            return np.full(t.shape, EOS, np.int32)
        tokens = self._bytes[np.where(is_eos, 0, t - before)].astype(np.int32) + NUM_SPECIAL
        return np.where(is_eos, EOS, tokens).astype(np.int32)


class _Chunks:
    """Random-access view of non-overlapping (L + 1)-token chunks of a stream."""

    def __init__(self, stream: np.ndarray, length: int, limit: int | None):
        self._stream, self._length = stream, length
        count = max(0, (len(stream) - 1) // length)
        self._count = count if limit is None else min(count, limit)

    def __len__(self):
        return self._count

    def __getitem__(self, i):
        if not 0 <= i < self._count:
            raise IndexError(i)
        start = i * self._length
        return self._stream[start : start + self._length + 1]


class TextLM(Task):
    """Byte-level LM over a text corpus; nominal length = context length in tokens."""

    NAME = "text"
    FAMILY = "text"
    METRIC = "ppl"
    LAYOUTS = ("decoder",)
    ALPHABET = OUTPUT_ALPHABET = BYTES
    DEFAULTS = {
        "train_lengths": "fixed",
        "min_length": 512,
        "max_length": 512,
        "curriculum_steps": 0,
        "eval_lengths": (512, 1024, 2048, 4096, 8192, 16384),
        "source": "stdlib",
        "pattern": "*.py",
        "data_dir": "",
        "eval_split": "validation",
    }

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self._streams: dict[tuple[str, str | None], TokenStream] = {}

    @property
    def chance(self):
        return None

    def builder(self, data_dir=None):
        from experiments.tasks import tfds_builders  # TFDS costs ~1 s to import: only on use

        return tfds_builders.text_builder(
            self.cfg["source"],
            pattern=self.cfg["pattern"],
            data_dir=data_dir or self.cfg["data_dir"] or None,
        )

    def stream(self, split: str, data_dir=None) -> TokenStream:
        """All documents of `split` as one token stream, EOS after each document."""
        key = (split, data_dir)
        if key not in self._streams:
            from experiments.tasks import tfds_builders

            builder = tfds_builders.prepare(self.builder(data_dir))
            self._streams[key] = TokenStream(*tfds_builders.text_stream_files(builder, split))
        return self._streams[key]

    def train_windows(self, rng: np.random.Generator, n: int, batch: int) -> np.ndarray:
        stream = self.stream("train")
        if len(stream) < n + 1:
            raise ValueError(f"text: train split has {len(stream)} tokens < window {n + 1}")
        start = rng.integers(0, len(stream) - n, size=batch)
        return stream[start[:, None] + np.arange(n + 1)[None, :]]

    def eval_chunks(self, length: int, *, data_dir=None, limit: int | None = None) -> _Chunks:
        return _Chunks(self.stream(self.cfg["eval_split"], data_dir), length, limit)

    def sequence_length(self, n, layout):
        return n

    def train_batch(self, rng, n, batch_size, layout):
        return layouts.format_lm(self.train_windows(rng, n, batch_size))

    def eval_source(self, length, *, num_examples, seed, data_dir=None):
        """Press et al.'s evaluation: the non-overlapping chunks of the eval split."""
        del seed
        return self.eval_chunks(length, data_dir=data_dir, limit=num_examples)

    def eval_batch(self, records, layout):
        return layouts.format_lm(np.stack(records))

    def extra_metrics(self, metrics):
        return {"ppl": math.exp(min(metrics["loss"], 700.0))}

    def encode(self, text):
        return [b + NUM_SPECIAL for b in text.encode("utf-8")]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if EOS in ids:
            ids = ids[: ids.index(EOS)]
        return bytes(i - NUM_SPECIAL for i in ids if i >= NUM_SPECIAL).decode("utf-8", "replace")

    def decoder_prompt(self, ids):
        return ids

    def render(self, prompt, completion):
        return prompt + completion

    def token_label(self, token_id):
        return chr(token_id - NUM_SPECIAL)

    def sample(self, rng, n, batch):
        raise TypeError("text: use train_windows / eval_chunks (no input/output pairs)")

    def example(self, seed, index, length):
        """Window of length + 1 tokens of the eval split at a (seed, index)-determined offset."""
        stream = self.stream(self.cfg["eval_split"])
        rng = np.random.default_rng([seed, index, length, self.id])
        start = int(rng.integers(0, len(stream) - length))
        window = stream[start : start + length + 1]
        empty = np.zeros(0, np.int32)
        return {"input": window, "output": empty, "output_mask": empty.astype(bool)}


TASKS = (TextLM,)
